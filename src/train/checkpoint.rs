//! Checkpoints in safetensors. One file holds the student and the teacher (parameters and BN
//! running statistics under `student.` / `teacher.` + torchvision's names), the LARS momentum
//! (`lars.momentum.` + name), and in its metadata the step, epoch, the partition RNG state, the
//! resolved config and a CRC-32 of all tensor bytes.
//!
//! A run folder keeps `checkpoint.safetensors` and the one before it,
//! `checkpoint.prev.safetensors`. Saving writes a temporary file, fsyncs it, moves the current
//! checkpoint to `.prev`, then renames the new one into place: at every moment at least one
//! complete checkpoint exists, and a torn or corrupt latest file is detected (safetensors'
//! header checks plus the CRC) so `load_latest` falls back to the previous one.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::bail;
use crate::error::{Error, Result};
use crate::nn::params::ParamStore;
use crate::nn::Network;
use crate::train::step::CarpState;

pub const FORMAT: &str = "carp-checkpoint";
pub const VERSION: &str = "1";
pub const LATEST: &str = "checkpoint.safetensors";
pub const PREVIOUS: &str = "checkpoint.prev.safetensors";

/// Non-tensor facts stored with a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointMeta {
    pub step: usize,
    pub epoch: usize,
    /// The resolved training config as JSON.
    pub config_json: String,
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

fn add_store<'a>(
    out: &mut BTreeMap<String, (Vec<usize>, &'a [u8])>,
    prefix: &str,
    store: &'a ParamStore,
    data: &'a [f32],
) {
    for e in &store.entries {
        out.insert(
            format!("{prefix}{}", e.name),
            (e.shape.clone(), f32_bytes(&data[e.range()])),
        );
    }
}

fn crc_of(tensors: &BTreeMap<String, (Vec<usize>, &[u8])>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (name, (_, bytes)) in tensors {
        h.update(name.as_bytes());
        h.update(bytes);
    }
    h.finalize()
}

fn rng_to_string(rng: &ChaCha8Rng) -> String {
    let seed: String = rng.get_seed().iter().map(|b| format!("{b:02x}")).collect();
    format!("{seed}:{}:{}", rng.get_stream(), rng.get_word_pos())
}

fn rng_from_string(s: &str) -> Option<ChaCha8Rng> {
    let mut parts = s.split(':');
    let seed_hex = parts.next()?;
    let stream: u64 = parts.next()?.parse().ok()?;
    let pos: u128 = parts.next()?.parse().ok()?;
    if seed_hex.len() != 64 {
        return None;
    }
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&seed_hex[2 * i..2 * i + 2], 16).ok()?;
    }
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_stream(stream);
    rng.set_word_pos(pos);
    Some(rng)
}

/// Serializes the whole training state.
pub fn to_bytes(state: &CarpState, meta: &CheckpointMeta) -> Result<Vec<u8>> {
    if !state.host_is_current() {
        // The state is on the GPU: the host stores would save old weights.
        bail!(
            Msg,
            "checkpoint: the training state is on the GPU, its host stores are old; call \
             CarpState::move_to_host() before saving"
        );
    }
    let mut tensors = BTreeMap::new();
    add_store(
        &mut tensors,
        "student.",
        &state.student.params,
        &state.student.params.data,
    );
    add_store(
        &mut tensors,
        "student.",
        &state.student.buffers,
        &state.student.buffers.data,
    );
    add_store(
        &mut tensors,
        "teacher.",
        &state.teacher.params,
        &state.teacher.params.data,
    );
    add_store(
        &mut tensors,
        "teacher.",
        &state.teacher.buffers,
        &state.teacher.buffers.data,
    );
    add_store(
        &mut tensors,
        "lars.momentum.",
        &state.student.params,
        &state.lars.momentum_buf,
    );
    let mut md = HashMap::new();
    md.insert("format".to_string(), FORMAT.to_string());
    md.insert("version".to_string(), VERSION.to_string());
    md.insert("step".to_string(), meta.step.to_string());
    md.insert("epoch".to_string(), meta.epoch.to_string());
    md.insert("nb".to_string(), state.nb.to_string());
    md.insert(
        "partition_rng".to_string(),
        rng_to_string(&state.partition_rng),
    );
    md.insert("config".to_string(), meta.config_json.clone());
    md.insert("crc32".to_string(), format!("{:08x}", crc_of(&tensors)));
    serialize_f32(&tensors, md, "checkpoint")
}

/// Named f32 tensors (name -> (shape, little-endian bytes)) plus metadata as safetensors bytes;
/// `what` names the file kind in errors.
fn serialize_f32(
    tensors: &BTreeMap<String, (Vec<usize>, &[u8])>,
    md: HashMap<String, String>,
    what: &str,
) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (shape, bytes))| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Msg(format!("{what} tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, Some(md))
        .map_err(|e| Error::Msg(format!("serializing {what}: {e}")))
}

fn read_store(
    st: &SafeTensors,
    path: &Path,
    prefix: &str,
    store: &ParamStore,
    data: &mut [f32],
) -> Result<()> {
    for e in &store.entries {
        let name = format!("{prefix}{}", e.name);
        let t = st.tensor(&name).map_err(|_| {
            Error::format(
                path,
                format!("missing tensor {name}: the checkpoint is from another model"),
            )
        })?;
        if t.dtype() != Dtype::F32 || t.shape() != e.shape.as_slice() {
            return Err(Error::format(
                path,
                format!(
                    "tensor {name}: expected f32 {:?}, found {:?} {:?}",
                    e.shape,
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        let dst = &mut data[e.range()];
        for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(())
}

/// Restores `state` (which must have been built from the same config) from checkpoint bytes.
/// Nothing in `state` changes unless the whole file is valid.
pub fn from_bytes(bytes: &[u8], path: &Path, state: &mut CarpState) -> Result<CheckpointMeta> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a valid checkpoint (torn or corrupt?): {e}"),
        )
    })?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(path, format!("unreadable header: {e}")))?;
    let md = header
        .metadata()
        .clone()
        .ok_or_else(|| Error::format(path, "no metadata: not a carp checkpoint"))?;
    let get = |k: &str| {
        md.get(k)
            .cloned()
            .ok_or_else(|| Error::format(path, format!("metadata field {k} missing")))
    };
    if get("format")? != FORMAT {
        return Err(Error::format(path, "not a carp checkpoint (format field)"));
    }
    let version = get("version")?;
    if version != VERSION {
        return Err(Error::format(
            path,
            format!("checkpoint version {version}, this build reads {VERSION}"),
        ));
    }
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        tensors.insert(name, (view.shape().to_vec(), view.data()));
    }
    let crc = format!("{:08x}", crc_of(&tensors));
    if crc != get("crc32")? {
        return Err(Error::format(
            path,
            "checksum mismatch: the checkpoint is corrupt",
        ));
    }
    let parse = |k: &str| -> Result<usize> {
        get(k)?
            .parse()
            .map_err(|_| Error::format(path, format!("metadata field {k} is not a number")))
    };
    let step = parse("step")?;
    let epoch = parse("epoch")?;
    let nb = parse("nb")?;
    let rng = rng_from_string(&get("partition_rng")?)
        .ok_or_else(|| Error::format(path, "bad partition_rng state"))?;

    // Every value is overwritten from the file below (committed only when all of it reads):
    // the host stores become the state, and the next GPU step uploads them (a device state
    // goes with `*state = new`).
    let mut new = state.clone_host_stores();
    let s = &mut new;
    read_store(
        &st,
        path,
        "student.",
        &state.student.params,
        &mut s.student.params.data,
    )?;
    read_store(
        &st,
        path,
        "student.",
        &state.student.buffers,
        &mut s.student.buffers.data,
    )?;
    read_store(
        &st,
        path,
        "teacher.",
        &state.teacher.params,
        &mut s.teacher.params.data,
    )?;
    read_store(
        &st,
        path,
        "teacher.",
        &state.teacher.buffers,
        &mut s.teacher.buffers.data,
    )?;
    read_store(
        &st,
        path,
        "lars.momentum.",
        &state.student.params,
        &mut s.lars.momentum_buf,
    )?;
    s.step = step;
    s.nb = nb;
    s.partition_rng = rng;
    *state = new;
    Ok(CheckpointMeta {
        step,
        epoch,
        config_json: get("config")?,
    })
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(path);
    Ok(())
}

/// Writes `bytes` to `path` and waits until they are on disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn sync_dir(path: &Path) {
    // Best effort: makes the rename durable on Linux; not all platforms can open a folder.
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Saves into a run folder, keeping the previous checkpoint as `checkpoint.prev.safetensors`.
pub fn save(run_dir: &Path, state: &CarpState, meta: &CheckpointMeta) -> Result<PathBuf> {
    fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let bytes = to_bytes(state, meta)?;
    let latest = run_dir.join(LATEST);
    let prev = run_dir.join(PREVIOUS);
    let tmp = run_dir.join("checkpoint.safetensors.tmp");
    write_synced(&tmp, &bytes)?;
    if latest.exists() {
        fs::rename(&latest, &prev).map_err(|e| Error::io(&latest, e))?;
    }
    fs::rename(&tmp, &latest).map_err(|e| Error::io(&latest, e))?;
    sync_dir(&latest);
    Ok(latest)
}

/// Loads one checkpoint file into `state`.
pub fn load_file(path: &Path, state: &mut CarpState) -> Result<CheckpointMeta> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path, state)
}

/// Loads the newest valid checkpoint of a run folder, falling back to the previous one when the
/// latest is missing, torn or corrupt. Returns the file used, its metadata, and warnings about
/// any file that was skipped.
pub fn load_latest(
    run_dir: &Path,
    state: &mut CarpState,
) -> Result<(PathBuf, CheckpointMeta, Vec<String>)> {
    let mut warnings = Vec::new();
    for name in [LATEST, PREVIOUS] {
        let path = run_dir.join(name);
        if !path.exists() {
            continue;
        }
        match load_file(&path, state) {
            Ok(meta) => return Ok((path, meta, warnings)),
            Err(e) => warnings.push(format!("skipping {}: {e}", path.display())),
        }
    }
    if warnings.is_empty() {
        bail!(
            Config,
            "no checkpoint in {}: nothing to resume (start without --resume)",
            run_dir.display()
        );
    }
    bail!(
        Msg,
        "no usable checkpoint in {}: {}",
        run_dir.display(),
        warnings.join("; ")
    )
}

/// The teacher backbone alone (parameters + BN running statistics), f32, under torchvision's
/// names: `torchvision.models.resnet50()` (or `resnet18()` for a ResNet18 run)
/// `.load_state_dict(..., strict=False)` takes it (only `fc` and `num_batches_tracked` are
/// missing).
pub fn export_backbone(net: &Network, out: &Path) -> Result<()> {
    let mut tensors = BTreeMap::new();
    let is_backbone = |n: &str| !n.starts_with("head.") && !n.starts_with("prototypes.");
    for (store, data) in [
        (&net.params, &net.params.data),
        (&net.buffers, &net.buffers.data),
    ] {
        for e in store.entries.iter().filter(|e| is_backbone(&e.name)) {
            tensors.insert(
                e.name.clone(),
                (e.shape.clone(), f32_bytes(&data[e.range()])),
            );
        }
    }
    let mut md = HashMap::new();
    md.insert("format".to_string(), "carp-backbone".to_string());
    md.insert("arch".to_string(), net.cfg.arch.clone());
    let bytes = serialize_f32(&tensors, md, "export")?;
    write_atomic(out, &bytes)
}

/// Loads an exported (torchvision-named) backbone into `net`'s backbone parameters and BN
/// statistics; the head and prototypes are left as they are.
pub fn import_backbone(path: &Path, net: &mut Network) -> Result<()> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let is_backbone = |n: &str| !n.starts_with("head.") && !n.starts_with("prototypes.");
    let mut new = net.clone();
    for (store, data) in [
        (&net.params, &mut new.params.data),
        (&net.buffers, &mut new.buffers.data),
    ] {
        let mut sub = ParamStore::new();
        for e in store.entries.iter().filter(|e| is_backbone(&e.name)) {
            sub.add(&e.name, &e.shape, vec![0.0; e.len()])?;
        }
        let mut tmp = vec![0.0; sub.numel()];
        read_store(&st, path, "", &sub, &mut tmp)?;
        for (e, se) in store
            .entries
            .iter()
            .filter(|e| is_backbone(&e.name))
            .zip(&sub.entries)
        {
            data[e.range()].copy_from_slice(&tmp[se.range()]);
        }
    }
    *net = new;
    Ok(())
}
