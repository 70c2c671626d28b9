//! From a module's input tensor to the rows the linear engine multiplies, and back.
//!
//! Dense modules take the input's leading dimensions as rows (`[..., in]` → `rows × in`).
//! Convolutions are im2col: one row per output pixel holding the `C·kh·kw` input values under
//! the kernel, in the order of a flattened Conv weight, zero where the kernel overhangs the
//! padding. Zero is exact under every input quantizer (its range always contains 0), so padding
//! before or after quantizing gives the same codes.

use crate::model::{runner, LinearKind, ModelError, Value};

/// Where rows came from, to put the results back.
#[derive(Clone, Debug)]
pub enum RowLayout {
    Dense {
        leading: Vec<usize>,
    },
    Conv {
        batch: usize,
        height: usize,
        width: usize,
    },
}

/// The rows (row-major, `in_features` each) of `x` for a module of `kind`.
pub fn to_rows(
    module: &str,
    kind: &LinearKind,
    in_features: usize,
    x: &Value,
) -> Result<(Vec<f32>, RowLayout), ModelError> {
    let shape = x.shape().to_vec();
    let values = runner::f32_values(x, &format!("the input of `{module}`"))?;
    let bad = |expected: String| {
        ModelError::Input(format!(
            "module `{module}` got an input of shape {shape:?}, expected {expected}"
        ))
    };
    match kind {
        LinearKind::Dense => {
            if shape.len() < 2 || shape[shape.len() - 1] != in_features {
                return Err(bad(format!("[..., {in_features}]")));
            }
            Ok((
                values.to_vec(),
                RowLayout::Dense {
                    leading: shape[..shape.len() - 1].to_vec(),
                },
            ))
        }
        LinearKind::Conv(g) => {
            let [b, c, h, w] = shape[..] else {
                return Err(bad(format!("[batch, {}, height, width]", g.in_channels)));
            };
            if c != g.in_channels {
                return Err(bad(format!("[batch, {}, height, width]", g.in_channels)));
            }
            let Some((ho, wo)) = g.output_size(h, w) else {
                return Err(bad(format!(
                    "an image at least as large as the {:?} kernel (dilation {:?})",
                    g.kernel, g.dilation
                )));
            };
            let [kh, kw] = g.kernel;
            let feats = g.features();
            let mut rows = vec![0f32; b * ho * wo * feats];
            for bi in 0..b {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let row = &mut rows[((bi * ho + oy) * wo + ox) * feats..][..feats];
                        for ci in 0..c {
                            let plane = &values[(bi * c + ci) * h * w..][..h * w];
                            for ky in 0..kh {
                                let y = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                    - g.pads[0] as isize;
                                if y < 0 || y >= h as isize {
                                    continue;
                                }
                                for kx in 0..kw {
                                    let xx = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                        - g.pads[1] as isize;
                                    if xx >= 0 && xx < w as isize {
                                        row[(ci * kh + ky) * kw + kx] =
                                            plane[y as usize * w + xx as usize];
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Ok((
                rows,
                RowLayout::Conv {
                    batch: b,
                    height: ho,
                    width: wo,
                },
            ))
        }
    }
}

/// A module compiled for `map`-sized convolution maps (a convolution after its first layer
/// gathers neighbours within the map) refuses inputs that give another size.
pub fn check_map(
    module: &str,
    map: Option<[usize; 2]>,
    layout: &RowLayout,
) -> Result<(), ModelError> {
    let Some([h, w]) = map else { return Ok(()) };
    match layout {
        RowLayout::Conv { height, width, .. } if (*height, *width) == (h, w) => Ok(()),
        RowLayout::Conv { height, width, .. } => Err(ModelError::Input(format!(
            "module `{module}` convolves {h}×{w} maps (the size it was compiled for: its inner \
             convolution gathers neighbours within the map), this input gives {height}×{width}: \
             compile with calibration images of this size"
        ))),
        RowLayout::Dense { .. } => Err(ModelError::Input(format!(
            "module `{module}` convolves {h}×{w} maps and takes [batch, channels, height, width] inputs"
        ))),
    }
}

/// The module's output tensor from row-major `rows × out` results.
pub fn from_rows(layout: &RowLayout, out: usize, y: &[f32]) -> Result<Value, ModelError> {
    match layout {
        RowLayout::Dense { leading } => {
            let mut shape = leading.clone();
            shape.push(out);
            runner::f32_tensor(&shape, y)
        }
        RowLayout::Conv {
            batch,
            height,
            width,
        } => {
            let pixels = height * width;
            let mut nchw = vec![0f32; y.len()];
            for b in 0..*batch {
                for p in 0..pixels {
                    for o in 0..out {
                        nchw[(b * out + o) * pixels + p] = y[(b * pixels + p) * out + o];
                    }
                }
            }
            runner::f32_tensor(&[*batch, out, *height, *width], &nchw)
        }
    }
}
