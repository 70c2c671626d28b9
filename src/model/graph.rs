//! Cutting remote modules out of a graph, and splitting what is left into stages.
//!
//! [`cut_remote_modules`] replaces each remote module by **one** node
//! `ai.hyfhe::RemoteModule(module = "<path>")` reading the module's input and producing its output,
//! and drops the initializers only that module used: this is the client's model, which holds no
//! private weight. [`StagePlan::new`] then splits a graph with such nodes into an alternation of
//! local segments (plain ONNX subgraphs that `tract` runs) and remote steps, so that `forward`
//! can await a server between two segments instead of blocking inside an inference engine.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{
    attribute_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    ValueInfoProto,
};

use super::{LinearModule, ModelError};

pub const REMOTE_DOMAIN: &str = "ai.hyfhe";
pub const REMOTE_OP: &str = "RemoteModule";

/// The client's model: every module in `modules` replaced by a placeholder node, their private
/// initializers removed.
pub fn cut_remote_modules(model: &ModelProto, modules: &[LinearModule]) -> ModelProto {
    let graph = model.graph.as_ref().expect("validated model");
    let mut removed: HashMap<usize, Option<&LinearModule>> = HashMap::new();
    for m in modules {
        let last = *m.nodes.iter().max().expect("a module has nodes");
        for &i in &m.nodes {
            // The placeholder takes the place of the module's last node: its input is produced
            // before that and every reader of its output comes after.
            removed.insert(i, (i == last).then_some(m));
        }
    }
    let mut nodes = Vec::with_capacity(graph.node.len());
    for (i, node) in graph.node.iter().enumerate() {
        match removed.get(&i) {
            None => nodes.push(node.clone()),
            Some(None) => {}
            Some(Some(m)) => nodes.push(NodeProto {
                input: vec![m.input.clone()],
                output: vec![m.output.clone()],
                name: format!("/hyfhe/{}", m.path),
                op_type: REMOTE_OP.into(),
                domain: REMOTE_DOMAIN.into(),
                attribute: vec![AttributeProto {
                    name: "module".into(),
                    r#type: attribute_proto::AttributeType::String as i32,
                    s: m.path.as_bytes().to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }
    // Nodes nothing reads any more (a top-level Identity or Cast of a remote module's bias,
    // the shape plumbing of its weight) go too: ONNX ops are pure, and a dead node would keep a
    // private initializer in the client's graph.
    let mut live: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; nodes.len()];
    for (k, node) in nodes.iter().enumerate().rev() {
        if node.output.iter().any(|o| live.contains(o)) {
            keep[k] = true;
            live.extend(node.input.iter().cloned());
        }
    }
    let mut k = 0;
    nodes.retain(|_| {
        k += 1;
        keep[k - 1]
    });
    let private: HashSet<&str> = modules
        .iter()
        .flat_map(|m| m.initializers.iter().map(String::as_str))
        .collect();
    // Whatever no remaining node reads goes too: the client's graph holds only what it runs.
    let used: HashSet<String> = nodes
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    let dropped: HashSet<String> = graph
        .initializer
        .iter()
        .filter(|t| private.contains(t.name.as_str()) || !used.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    let mut cut = model.clone();
    let g = cut.graph.as_mut().expect("validated model");
    g.node = nodes;
    g.initializer.retain(|t| !dropped.contains(&t.name));
    // Old exports list initializers among the graph inputs too; a dropped one is no input.
    g.input.retain(|i| !dropped.contains(&i.name));
    g.value_info.clear();
    if !cut.opset_import.iter().any(|o| o.domain == REMOTE_DOMAIN) {
        cut.opset_import.push(OperatorSetIdProto {
            domain: REMOTE_DOMAIN.into(),
            version: 1,
        });
    }
    cut
}

/// Graph inputs that are not initializers.
pub fn runtime_inputs(graph: &GraphProto) -> Vec<String> {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .map(|i| i.name.clone())
        .collect()
}

/// The module path a placeholder node stands for.
pub fn remote_module_of(node: &NodeProto) -> Option<String> {
    (node.domain == REMOTE_DOMAIN && node.op_type == REMOTE_OP).then(|| {
        node.attribute
            .iter()
            .find(|a| a.name == "module")
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
            .unwrap_or_default()
    })
}

/// One step of a forward pass.
#[derive(Clone, Debug)]
pub enum Stage {
    /// A plain ONNX subgraph: reads `inputs` from the environment, writes `outputs` back.
    Local {
        model: Box<ModelProto>,
        inputs: Vec<String>,
        outputs: Vec<String>,
    },
    /// A remote module: `output = module(input)`.
    Remote {
        module: String,
        input: String,
        output: String,
    },
}

/// Stages in execution order, plus the model's own inputs and outputs.
#[derive(Clone, Debug)]
pub struct StagePlan {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub stages: Vec<Stage>,
}

impl StagePlan {
    /// Split `model` at its placeholder nodes.
    ///
    /// Each tensor gets a *level*: graph inputs are level 0, a local node's outputs take the
    /// highest level of its inputs, and a remote node's output is one above its input. Local
    /// nodes of level `k` form segment `k`, which runs after the remote nodes that produce level
    /// `k` and before those that read it — so arbitrary DAGs (skip connections around a remote
    /// module, parallel remote modules) split correctly. Constant subgraphs (initializers,
    /// `Constant` nodes, whatever only depends on them) are copied into every segment that uses
    /// them, so `tract` still sees constant shapes.
    pub fn new(model: &ModelProto) -> Result<Self, ModelError> {
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| ModelError::Decode("the model has no graph".into()))?;
        let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs = runtime_inputs(graph);
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();

        let mut constant: HashSet<&str> = inits.clone();
        let mut const_node = vec![false; graph.node.len()];
        let mut level: HashMap<&str, usize> = inputs.iter().map(|i| (i.as_str(), 0)).collect();
        let mut node_level = vec![0usize; graph.node.len()];
        let mut remotes: Vec<(usize, usize)> = Vec::new(); // (level of input, node index)
        for (i, node) in graph.node.iter().enumerate() {
            let live: Vec<&str> = node
                .input
                .iter()
                .map(String::as_str)
                .filter(|t| !t.is_empty() && !constant.contains(t))
                .collect();
            if live.is_empty() && remote_module_of(node).is_none() {
                const_node[i] = true;
                constant.extend(node.output.iter().map(String::as_str));
                continue;
            }
            let mut lvl = 0;
            for t in &live {
                lvl = lvl.max(*level.get(t).ok_or_else(|| {
                    ModelError::Decode(format!(
                        "node `{}` reads `{t}`, which nothing before it produces",
                        node.name
                    ))
                })?);
            }
            node_level[i] = lvl;
            let out_level = if remote_module_of(node).is_some() {
                remotes.push((lvl, i));
                lvl + 1
            } else {
                lvl
            };
            for o in &node.output {
                level.insert(o, out_level);
            }
        }
        let top = level.values().copied().max().unwrap_or(0);

        // Who reads each tensor: (level of the reader, is it a remote node).
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            if const_node[i] {
                continue;
            }
            for t in &node.input {
                readers.entry(t.as_str()).or_default().push(i);
            }
        }
        let producers: HashMap<&str, usize> = graph
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
            .collect();

        let mut stages = Vec::new();
        for k in 0..=top {
            let members: Vec<usize> = (0..graph.node.len())
                .filter(|&i| {
                    !const_node[i]
                        && node_level[i] == k
                        && remote_module_of(&graph.node[i]).is_none()
                })
                .collect();
            if !members.is_empty() {
                stages.push(segment(
                    model,
                    graph,
                    &members,
                    &const_node,
                    &producers,
                    &readers,
                    &outputs,
                    &inits,
                ));
            }
            for &(lvl, i) in &remotes {
                if lvl == k {
                    let node = &graph.node[i];
                    stages.push(Stage::Remote {
                        module: remote_module_of(node).unwrap_or_default(),
                        input: node.input[0].clone(),
                        output: node.output[0].clone(),
                    });
                }
            }
        }
        Ok(Self {
            inputs,
            outputs,
            stages,
        })
    }

    pub fn remote_modules(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().filter_map(|s| match s {
            Stage::Remote { module, .. } => Some(module.as_str()),
            Stage::Local { .. } => None,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn segment(
    model: &ModelProto,
    graph: &GraphProto,
    members: &[usize],
    const_node: &[bool],
    producers: &HashMap<&str, usize>,
    readers: &HashMap<&str, Vec<usize>>,
    outputs: &[String],
    inits: &HashSet<&str>,
) -> Stage {
    let member_set: HashSet<usize> = members.iter().copied().collect();
    // The constant nodes this segment needs, transitively.
    let mut needed_const: HashSet<usize> = HashSet::new();
    let mut stack: Vec<&str> = members
        .iter()
        .flat_map(|&i| graph.node[i].input.iter().map(String::as_str))
        .collect();
    let mut needed_inits: HashSet<&str> = HashSet::new();
    while let Some(t) = stack.pop() {
        if inits.contains(t) {
            needed_inits.insert(t);
        } else if let Some(&p) = producers.get(t) {
            if const_node[p] && needed_const.insert(p) {
                stack.extend(graph.node[p].input.iter().map(String::as_str));
            }
        }
    }
    let nodes: Vec<NodeProto> = (0..graph.node.len())
        .filter(|i| member_set.contains(i) || needed_const.contains(i))
        .map(|i| graph.node[i].clone())
        .collect();
    let produced: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    let mut seg_inputs: Vec<String> = Vec::new();
    for n in &nodes {
        for t in &n.input {
            if !t.is_empty()
                && !produced.contains(t.as_str())
                && !inits.contains(t.as_str())
                && !seg_inputs.contains(t)
            {
                seg_inputs.push(t.clone());
            }
        }
    }
    let mut seg_outputs: Vec<String> = Vec::new();
    for &i in members {
        for o in &graph.node[i].output {
            let read_elsewhere = readers
                .get(o.as_str())
                .is_some_and(|r| r.iter().any(|j| !member_set.contains(j)));
            if (read_elsewhere || outputs.contains(o)) && !seg_outputs.contains(o) {
                seg_outputs.push(o.clone());
            }
        }
    }
    let value_info = |name: &String| {
        graph
            .input
            .iter()
            .find(|v| v.name == *name)
            .cloned()
            .unwrap_or_else(|| ValueInfoProto {
                name: name.clone(),
                ..Default::default()
            })
    };
    let mut sub = model.clone();
    sub.opset_import.retain(|o| o.domain != REMOTE_DOMAIN);
    sub.graph = Some(GraphProto {
        node: nodes,
        name: graph.name.clone(),
        initializer: graph
            .initializer
            .iter()
            .filter(|t| needed_inits.contains(t.name.as_str()))
            .cloned()
            .collect(),
        input: seg_inputs.iter().map(value_info).collect(),
        output: seg_outputs
            .iter()
            .map(|name| ValueInfoProto {
                name: name.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    Stage::Local {
        model: Box::new(sub),
        inputs: seg_inputs,
        outputs: seg_outputs,
    }
}
