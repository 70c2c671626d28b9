"""Type stubs of the Rust extension (see python/src/lib.rs)."""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

class HyfheError(Exception): ...

class ServerError(HyfheError):
    """args: (message, HTTP status, error code)."""

class ServerUnreachable(HyfheError): ...

class Modules:
    def __init__(self, model_name: str) -> None: ...
    @staticmethod
    def load(path: str, trees: str = "all") -> "Modules": ...
    @property
    def name(self) -> str: ...
    @property
    def front(self) -> str: ...
    @property
    def module_names(self) -> List[str]: ...
    def clear(self) -> None: ...
    def has_server(self) -> bool: ...
    def spec(self, name: str) -> Dict[str, object]: ...
    def compile_linear(
        self,
        name: str,
        weight: npt.NDArray[np.float32],
        bias: Optional[npt.NDArray[np.float32]] = None,
        input_range: Optional[Tuple[float, float]] = None,
        n_bits: int = 8,
        dynamic: bool = False,
        precision: str = "exact",
    ) -> Dict[str, object]: ...
    def compile_backward(
        self,
        name: str,
        forward: str,
        weight: npt.NDArray[np.float32],
        n_bits: int = 8,
        precision: str = "exact",
    ) -> Dict[str, object]: ...
    def compile_learned(
        self,
        name: str,
        codes: npt.NDArray[np.int8],
        weight_bits: int,
        weight_scale: Sequence[float],
        weight_zero_point: Sequence[int],
        bias: Optional[npt.NDArray[np.float32]],
        input: Optional[Tuple[int, float, int]] = None,
        input_range: Optional[Tuple[float, float]] = None,
        n_bits: int = 8,
        conv: Optional[
            Tuple[Tuple[int, int], Tuple[int, int, int, int], Tuple[int, int]]
        ] = None,
        precision: str = "exact",
    ) -> Dict[str, object]: ...
    def compile_conv2d(
        self,
        name: str,
        weight: npt.NDArray[np.float32],
        bias: Optional[npt.NDArray[np.float32]],
        stride: Tuple[int, int],
        padding: Tuple[int, int, int, int],
        dilation: Tuple[int, int],
        input_range: Optional[Tuple[float, float]] = None,
        n_bits: int = 8,
        dynamic: bool = False,
        precision: str = "exact",
    ) -> Dict[str, object]: ...
    def compile_onnx(
        self,
        name: str,
        onnx: bytes,
        path: str,
        calibration: npt.NDArray[np.float32],
        n_bits: int = 8,
        rounding_bits: Optional[int] = None,
    ) -> Dict[str, object]: ...
    def forward(
        self, name: str, x: npt.NDArray[np.float32], mode: str, stats: bool = False
    ) -> Any: ...
    def save(
        self,
        path: str,
        client_files: Dict[str, bytes],
        private_files: Dict[str, bytes],
        force: bool = False,
    ) -> None: ...
    def client_file(self, path: str) -> Optional[bytes]: ...

class RemoteSession:
    def __init__(
        self,
        modules: Modules,
        url: str,
        api_key: str,
        ca_cert: Optional[str] = None,
        key: str = "full",
    ) -> None: ...
    def forward(self, name: str, x: npt.NDArray[np.float32], stats: bool = False) -> Any:
        """The module's output, or (output, stats) with stats=True."""
    def close(self) -> None: ...
    @property
    def id(self) -> str: ...
    @property
    def uploaded_key_bytes(self) -> int: ...

def download_client(
    url: str, api_key: str, model: str, path: str, ca_cert: Optional[str] = None
) -> None: ...
