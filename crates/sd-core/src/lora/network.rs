//! A LoRA network attached to loaded models: created fresh for training or from a weights
//! file, applied (its modules add `multiplier·scale·up(down(x))` to their layers' outputs),
//! merged into the base weights, with a multiplier that can change at any time. Several
//! networks can be applied to the same model at once, each with its own multiplier.
//!
//! # Source
//! sd-scripts `networks/lora.py` (`LoRANetwork`, `create_network`,
//! `create_network_from_weights`, `apply_to`, `merge_to`, `set_multiplier`);
//! `../shared/spec/generation.md` §7 and §10 (library usage).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;
use tch::{Device, Kind, Tensor, nn::VarStore};

use super::blockwise::{BlockRanks, select_block_modules};
use super::dylora::{self, RankSampler};
use super::file::{LoraTensors, LoraWeights};
use super::module::{Dropouts, LoraModule};
use super::names::{Layer, ModuleSpec, NetworkOptions, select_modules};
use super::{LoraError, Result};
use crate::models::layers::{AdapterSlot, LayerAdapter, LayerHandle, SharedAdapter};

/// The layers of one model component a network may attach to.
pub struct ComponentLayers<'a> {
    /// Which component (`Unet`, `TextEncoder`, `TextEncoder2`).
    pub component: Component,
    /// Its Linear/Conv2d layers (e.g. `Unet::lora_layers`).
    pub layers: &'a [LayerHandle],
}

/// The adapter a module becomes inside a layer.
struct ModuleAdapter {
    module: Arc<Mutex<LoraModule>>,
    train: Arc<AtomicBool>,
    /// DyLoRA rank sampler of the network (`None` for plain LoRA), shared by all modules.
    dylora: DyloraSlot,
}

/// The network-wide DyLoRA sampler, set by [`LoraNetwork::enable_dylora`].
type DyloraSlot = Arc<Mutex<Option<RankSampler>>>;

impl LayerAdapter for ModuleAdapter {
    fn delta(&self, x: &Tensor) -> Option<Tensor> {
        let train = self.train.load(Ordering::Relaxed);
        let m = self.module.lock().expect("LoRA module lock");
        if train && let Some(s) = self.dylora.lock().expect("DyLoRA lock").as_mut() {
            let (b, unit) = (s.draw(m.rank()), s.unit());
            let xk = x.to_kind(m.lora_down.kind());
            return Some(dylora::forward_delta(&m, &xk, b, unit).to_kind(x.kind()));
        }
        // The module's tensors may be f32 while the model runs in half precision.
        let kind = x.kind();
        if m.lora_down.kind() == kind {
            m.forward_delta(x, train)
        } else {
            m.forward_delta(&x.to_kind(m.lora_down.kind()), train)
                .map(|d| d.to_kind(kind))
        }
    }
}

/// One module of a network with the layer it belongs to.
struct Attached {
    spec: ModuleSpec,
    module: Arc<Mutex<LoraModule>>,
    adapter: SharedAdapter,
    slot: AdapterSlot,
    weight: Tensor,
}

/// What [`LoraNetwork::from_weights`] placed and what it could not.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Modules placed per component name (`unet`, `text_encoder`, `text_encoder_2`).
    pub applied: BTreeMap<&'static str, usize>,
    /// Module names of the file that match no layer of the given models.
    pub unmatched: Vec<String>,
}

impl ApplyReport {
    /// Total number of modules placed.
    pub fn total(&self) -> usize {
        self.applied.values().sum()
    }
}

/// A LoRA network over one model's components.
pub struct LoraNetwork {
    family: ModelFamily,
    modules: Vec<Attached>,
    train: Arc<AtomicBool>,
    dylora: DyloraSlot,
    applied: bool,
    /// Holds the trainable variables of a freshly created network (empty for loaded ones).
    vs: VarStore,
}

fn layer_index(layers: &[LayerHandle]) -> HashMap<&str, &LayerHandle> {
    layers.iter().map(|h| (h.path.as_str(), h)).collect()
}

impl LoraNetwork {
    /// Creates a freshly initialised network (spec §3.1: down Kaiming-uniform, up zero, so the
    /// model is unchanged until trained) for every targeted layer of `components`, with f32
    /// trainable weights on `device`. Not yet applied: call [`LoraNetwork::apply`].
    ///
    /// # Errors
    /// [`LoraError`] from module selection (e.g. an SDXL U-Net layer the key table cannot map).
    pub fn create(
        family: ModelFamily,
        components: &[ComponentLayers<'_>],
        opts: &NetworkOptions,
        dropouts: Dropouts,
        device: Device,
    ) -> Result<Self> {
        Self::create_with_blocks(family, components, opts, None, dropouts, device)
    }

    /// [`LoraNetwork::create`] with block-wise ranks (`block_dims` & co., spec §6.2): U-Net
    /// modules take the rank/alpha of their block and blocks of rank 0 get no module; `None`
    /// is the same as [`LoraNetwork::create`].
    ///
    /// # Errors
    /// [`LoraError`] from module selection.
    pub fn create_with_blocks(
        family: ModelFamily,
        components: &[ComponentLayers<'_>],
        opts: &NetworkOptions,
        blocks: Option<&BlockRanks>,
        dropouts: Dropouts,
        device: Device,
    ) -> Result<Self> {
        let vs = VarStore::new(device);
        let train = Arc::new(AtomicBool::new(false));
        let dylora: DyloraSlot = Arc::new(Mutex::new(None));
        let mut modules = Vec::new();
        for c in components {
            let layers: Vec<Layer> = c.layers.iter().map(LayerHandle::layer).collect();
            let index = layer_index(c.layers);
            let specs = match blocks {
                Some(b) => select_block_modules(family, c.component, &layers, opts, b)?,
                None => select_modules(family, c.component, &layers, opts)?,
            };
            for spec in specs {
                let handle = index[spec.layer_path.as_str()];
                let mut module = LoraModule::init(&vs.root(), &spec);
                module.dropouts = dropouts;
                modules.push(Self::attach(spec, module, handle, &train, &dylora));
            }
        }
        Ok(Self {
            family,
            modules,
            train,
            dylora,
            applied: false,
            vs,
        })
    }

    /// Builds a network from loaded weights for the layers of `components`, with `multiplier`
    /// (spec generation.md §7.1). Module tensors are moved to each layer's device in f32.
    /// Not yet applied: call [`LoraNetwork::apply`] or [`LoraNetwork::merge`].
    ///
    /// # Errors
    /// [`LoraError::Invalid`] when no module matches any layer (usually a LoRA for another
    /// model family — the message says which family the file looks like);
    /// [`LoraError::ShapeMismatch`] when a module's shapes do not fit its layer.
    pub fn from_weights(
        weights: &LoraWeights,
        family: ModelFamily,
        components: &[ComponentLayers<'_>],
        multiplier: f64,
    ) -> Result<(Self, ApplyReport)> {
        // Every name a module of this model could have: all containers, both ranks.
        let superset = NetworkOptions {
            network_dim: 1,
            network_alpha: 1.0,
            conv_dim: Some(1),
            conv_alpha: Some(1.0),
        };
        let mut by_name: HashMap<String, (ModuleSpec, &LayerHandle)> = HashMap::new();
        for c in components {
            let layers: Vec<Layer> = c.layers.iter().map(LayerHandle::layer).collect();
            let index = layer_index(c.layers);
            for spec in select_modules(family, c.component, &layers, &superset)? {
                let handle = index[spec.layer_path.as_str()];
                by_name.insert(spec.name.clone(), (spec, handle));
            }
        }
        let train = Arc::new(AtomicBool::new(false));
        let dylora: DyloraSlot = Arc::new(Mutex::new(None));
        let mut report = ApplyReport::default();
        let mut modules = Vec::new();
        for (name, t) in &weights.modules {
            let Some((spec, handle)) = by_name.get(name) else {
                report.unmatched.push(name.clone());
                continue;
            };
            let module =
                Self::module_from_tensors(name, spec, t, handle.weight.device(), multiplier)?;
            let mut spec = spec.clone();
            spec.rank = module.rank();
            spec.alpha = module.alpha() as f32;
            *report.applied.entry(spec.component.name()).or_default() += 1;
            modules.push(Self::attach(spec, module, handle, &train, &dylora));
        }
        if modules.is_empty() {
            let looks_like = weights
                .family
                .map_or_else(|| "an unknown family".to_owned(), |f| format!("{f:?}"));
            return Err(LoraError::Invalid(format!(
                "no LoRA module matches this {family:?} model ({} module(s) in the file; by its names the file looks like {looks_like}): a LoRA for another model family is the usual cause",
                weights.modules.len()
            )));
        }
        Ok((
            Self {
                family,
                modules,
                train,
                dylora,
                applied: false,
                vs: VarStore::new(Device::Cpu),
            },
            report,
        ))
    }

    fn module_from_tensors(
        name: &str,
        spec: &ModuleSpec,
        t: &LoraTensors,
        device: Device,
        multiplier: f64,
    ) -> Result<LoraModule> {
        let down = t.down.to_device(device).to_kind(Kind::Float);
        let up = t.up.to_device(device).to_kind(Kind::Float);
        let mut module = LoraModule::from_tensors(name, spec.layer, down, up, t.alpha)?;
        module.multiplier = multiplier;
        Ok(module)
    }

    fn attach(
        spec: ModuleSpec,
        module: LoraModule,
        handle: &LayerHandle,
        train: &Arc<AtomicBool>,
        dylora: &DyloraSlot,
    ) -> Attached {
        let module = Arc::new(Mutex::new(module));
        let adapter: SharedAdapter = Arc::new(Mutex::new(ModuleAdapter {
            module: module.clone(),
            train: train.clone(),
            dylora: dylora.clone(),
        }));
        Attached {
            spec,
            module,
            adapter,
            slot: handle.slot.clone(),
            weight: handle.weight.shallow_clone(),
        }
    }

    /// The family the network was built for.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// True when the network has no module.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Module specs (names, layers, ranks), in creation order.
    pub fn specs(&self) -> impl Iterator<Item = &ModuleSpec> {
        self.modules.iter().map(|m| &m.spec)
    }

    /// Attaches every module to its layer (idempotent).
    pub fn apply(&mut self) {
        if !self.applied {
            for m in &self.modules {
                m.slot.push(m.adapter.clone());
            }
            self.applied = true;
        }
    }

    /// Detaches every module from its layer (idempotent).
    pub fn remove(&mut self) {
        if self.applied {
            for m in &self.modules {
                m.slot.remove(&m.adapter);
            }
            self.applied = false;
        }
    }

    /// Sets the strength of every module; takes effect at the next forward.
    pub fn set_multiplier(&self, multiplier: f64) {
        for m in &self.modules {
            m.module.lock().expect("LoRA module lock").multiplier = multiplier;
        }
    }

    /// Turns the network into a DyLoRA network (`networks.dylora`, spec §7): in training mode
    /// every module forward draws its trainable rank slice from a sampler seeded with `seed`
    /// and computes [`dylora::forward_delta`]; in inference the modules act as plain LoRAs of
    /// their full rank. Files keep the plain LoRA layout.
    ///
    /// # Errors
    /// [`LoraError::Invalid`] when `unit` is 0 or a module's rank is no multiple of `unit`.
    pub fn enable_dylora(&self, unit: usize, seed: u64) -> Result<()> {
        if unit == 0 {
            return Err(LoraError::Invalid("DyLoRA unit must be at least 1".into()));
        }
        if let Some(m) = self
            .modules
            .iter()
            .find(|m| !m.spec.rank.is_multiple_of(unit))
        {
            return Err(LoraError::Invalid(format!(
                "DyLoRA: module {} has rank {}, which is no multiple of unit {unit}",
                m.spec.name, m.spec.rank
            )));
        }
        *self.dylora.lock().expect("DyLoRA lock") = Some(RankSampler::new(unit, seed));
        Ok(())
    }

    /// Training mode (dropouts active) or inference.
    pub fn set_train(&self, train: bool) {
        self.train.store(train, Ordering::Relaxed);
    }

    /// Folds `multiplier·ΔW` of every module into its layer's weight, in place (computed in f32,
    /// stored back in the weight's dtype), and detaches the modules, so that the model alone
    /// now gives what model + applied network gave (spec §3.3; sd-scripts `merge_to`).
    pub fn merge(&mut self) {
        self.remove();
        tch::no_grad(|| {
            for m in &self.modules {
                let module = m.module.lock().expect("LoRA module lock");
                let delta = module.delta_weight().to_device(m.weight.device()) * module.multiplier;
                let mut w = m.weight.shallow_clone();
                let merged = (w.to_kind(Kind::Float) + delta.reshape(w.size())).to_kind(w.kind());
                w.copy_(&merged);
            }
        });
    }

    /// The trainable tensors per component (`lora_down`, `lora_up` of each module), for the
    /// optimiser's parameter groups (text encoder lr vs U-Net lr, spec training.md §7.5).
    pub fn parameters(&self) -> Vec<(Component, Vec<Tensor>)> {
        let mut groups: Vec<(Component, Vec<Tensor>)> = Vec::new();
        for m in &self.modules {
            let module = m.module.lock().expect("LoRA module lock");
            let pair = [
                module.lora_down.shallow_clone(),
                module.lora_up.shallow_clone(),
            ];
            match groups.iter_mut().find(|(c, _)| *c == m.spec.component) {
                Some((_, v)) => v.extend(pair),
                None => groups.push((m.spec.component, pair.into())),
            }
        }
        groups
    }

    /// The trainable tensors of the U-Net modules grouped by block index (spec §5; ascending),
    /// for block-wise learning rates (`down_lr_weight` & co., spec §6.1).
    pub fn unet_parameters_by_block(&self) -> Vec<(i32, Vec<Tensor>)> {
        let mut groups: BTreeMap<i32, Vec<Tensor>> = BTreeMap::new();
        for m in self
            .modules
            .iter()
            .filter(|m| m.spec.component == Component::Unet)
        {
            let module = m.module.lock().expect("LoRA module lock");
            groups.entry(m.spec.block_index).or_default().extend([
                module.lora_down.shallow_clone(),
                module.lora_up.shallow_clone(),
            ]);
        }
        groups.into_iter().collect()
    }

    /// Sets `requires_grad` on every module weight (false for a frozen component).
    pub fn set_requires_grad(&self, component: Component, requires_grad: bool) {
        for m in self
            .modules
            .iter()
            .filter(|m| m.spec.component == component)
        {
            let module = m.module.lock().expect("LoRA module lock");
            let _ = module.lora_down.set_requires_grad(requires_grad);
            let _ = module.lora_up.set_requires_grad(requires_grad);
        }
    }

    /// Casts every module's `lora_down` / `lora_up` to `kind` in place (`--full_fp16` /
    /// `--full_bf16`: the trainable weights, and so their gradients, in half precision). The
    /// tensors keep their identity (`set_data`), so handles taken earlier, e.g. by
    /// [`LoraNetwork::parameters`], see the new dtype; `requires_grad` is kept.
    ///
    /// # Source
    /// sd-scripts `train_network.py`: `network.to(weight_dtype)` under `full_fp16`/`full_bf16`
    /// (spec training.md §6.8).
    pub fn set_kind(&self, kind: Kind) {
        let _guard = tch::no_grad_guard();
        for m in &self.modules {
            let module = m.module.lock().expect("LoRA module lock");
            for t in [&module.lora_down, &module.lora_up] {
                if t.kind() != kind {
                    let cast = t.to_kind(kind);
                    t.shallow_clone().set_data(&cast);
                }
            }
        }
    }

    /// Copies the current module tensors into a [`LoraWeights`] for saving (in the modules'
    /// dtype: f32, or half after [`LoraNetwork::set_kind`]; the save options choose the file
    /// dtype, `None` keeps this one).
    pub fn to_weights(&self) -> LoraWeights {
        let guards: Vec<_> = self
            .modules
            .iter()
            .map(|m| m.module.lock().expect("LoRA module lock"))
            .collect();
        LoraWeights::from_modules(guards.iter().map(|g| &**g))
    }

    /// Copies the tensors of `weights` into the modules of the same name (`--network_weights`,
    /// `--resume`): shapes must match exactly and alphas must agree with the network's (the
    /// reference keeps the old scale after loading a different alpha, spec training.md §7.6;
    /// we refuse instead). Modules of the file this network lacks are reported, not fatal.
    /// Returns the number of modules loaded.
    ///
    /// # Errors
    /// [`LoraError::ShapeMismatch`] / [`LoraError::Invalid`] naming the module.
    pub fn load_module_weights(&self, weights: &LoraWeights) -> Result<usize> {
        let mut loaded = 0;
        let mut unknown = Vec::new();
        let by_name: HashMap<&str, &Attached> = self
            .modules
            .iter()
            .map(|m| (m.spec.name.as_str(), m))
            .collect();
        for (name, t) in &weights.modules {
            let Some(m) = by_name.get(name.as_str()) else {
                unknown.push(name.clone());
                continue;
            };
            let module = m.module.lock().expect("LoRA module lock");
            let check = LoraModule::from_tensors(
                name,
                m.spec.layer,
                t.down.shallow_clone(),
                t.up.shallow_clone(),
                t.alpha,
            )?;
            if check.rank() != module.rank() {
                return Err(LoraError::Invalid(format!(
                    "module {name}: the file has rank {}, the network {}",
                    check.rank(),
                    module.rank()
                )));
            }
            if (check.alpha() - module.alpha()).abs() > 1e-6 * module.alpha().abs().max(1.0) {
                return Err(LoraError::Invalid(format!(
                    "module {name}: the file has alpha {}, the network {} (set --network_alpha to the file's value)",
                    check.alpha(),
                    module.alpha()
                )));
            }
            tch::no_grad(|| {
                module.lora_down.shallow_clone().copy_(&check.lora_down);
                module.lora_up.shallow_clone().copy_(&check.lora_up);
            });
            loaded += 1;
        }
        if !unknown.is_empty() {
            tracing::warn!(
                "{} module(s) of the weights match no module of this network: {}",
                unknown.len(),
                unknown.join(", ")
            );
        }
        Ok(loaded)
    }

    /// The var store holding a created network's trainable variables (empty for networks
    /// loaded from weights).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }
}

impl Drop for LoraNetwork {
    fn drop(&mut self) {
        self.remove();
    }
}
