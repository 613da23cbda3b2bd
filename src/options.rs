//! Run options: the engine's switches between equivalent ways of computing a step (fused or
//! separate BN ops, what backward recomputes, the bf16 layout, cuDNN's math and algorithm
//! choice, where views are finished, where the step waits).
//!
//! They are one struct of explicit values. `carp train` and `carp-bench` take them as flags
//! ([`RunOptionArgs`]); the `CARP_*` environment variables of earlier versions remain a
//! fallback, parsed here and nowhere else, where an unknown value is an error listing the valid
//! ones. A run records the values it used: in config.json, in the first line of every
//! invocation's metrics.jsonl, in its checkpoints (through the config), and carp-bench in its
//! table and JSON; `--resume` reports any option that changed.
//!
//! The values in force are installed process-wide by the entry points ([`install`]) and read
//! where each switch acts ([`current`]): the model when it is built, the tape, the step, the
//! loader's finish and the CUDA backend's plans. Without [`install`] the defaults apply; no
//! code reads the environment behind the caller's back.
//!
//! None of them changes the method: every pair of values computes the same step (bit-identical
//! on the CPU; on a GPU within the tolerances the GPU tests state, e.g. TF32 vs FMA), which is
//! why they are options and not part of the model's configuration.

use std::sync::RwLock;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::Result;

/// An on/off switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn on(self) -> bool {
        self == Switch::On
    }
}

/// What ResNet training (with the fused BN ops) recomputes in backward instead of keeping
/// alive from the forward (src/ops/recompute.rs). Per bottleneck the tape otherwise keeps 12
/// activation-widths (conv1's output, bn1 + ReLU's, conv2's, bn2 + ReLU's, conv3's (4), the
/// block output (4)); the values are bit-identical at every level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
pub enum Recompute {
    /// Keep everything the ops save.
    #[serde(rename = "none")]
    #[value(name = "none")]
    Nothing,
    /// The inner BN + ReLU outputs (the inputs of conv2 and conv3): 12 -> 10 widths, for an
    /// apply pass each in backward; and the ImageNet stem's BN + ReLU output (the max pool's
    /// input).
    #[serde(rename = "bn")]
    #[value(name = "bn")]
    BnOutputs,
    /// Also conv3's output (bn3's input): 12 -> 6 widths, for a second forward of the 1x1 conv3
    /// (~1/4 of a bottleneck's FLOPs) in backward. The default.
    #[serde(rename = "all")]
    #[value(name = "all")]
    BnAndConv3,
}

/// The layout of bf16 activations on a GPU (f32 tensors are always NCHW).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Bf16Layout {
    /// Channels-last: the layout of cuDNN's fastest bf16 convolutions (the default).
    Nhwc,
    /// Channels-first, the A/B of the NHWC kernels.
    Nchw,
}

/// How channels-last BN statistics read x on a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BnStats {
    /// One read of x, shifted sums (the default).
    OnePass,
    /// Sums, then squared deviations from the mean (the NCHW kernels' method).
    TwoPass,
}

/// Where a GPU run finishes its views (colour jitter, grayscale, blur, solarize, normalize).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ViewFinish {
    /// On the GPU from the loader's u8 crops (kernels/augment.cu; the default).
    Gpu,
    /// In the loader threads (what a CPU run always does).
    Cpu,
}

/// How a GPU step's NaN guard holds back the updates of a non-finite step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NanGuard {
    /// A device-side verdict gates the update kernels; the step waits once, at its end (the
    /// default).
    Gated,
    /// The host reads the verdict before queuing the updates (a wait mid-step), and checks the
    /// prototype norms with a row-naming error.
    Sync,
}

/// The run options in force. Serialized (config.json, metrics, checkpoints, carp-bench) with
/// the flags' names and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunOptions {
    /// Fused BN + ReLU (+ residual add) ops in ResNets (off: the separate ops).
    pub fused_bn: Switch,
    /// What ResNet training recomputes in backward (with the fused BN ops).
    pub recompute: Recompute,
    /// The layout of bf16 activations on a GPU.
    pub bf16_layout: Bf16Layout,
    /// TF32 allowed in cuDNN convolutions of f32 tensors.
    pub tf32: Switch,
    /// cuDNN algorithms chosen by timing (`cudnnFind*`, once per shape) instead of the
    /// heuristic's first choice.
    pub cudnn_find: Switch,
    /// Channels-last BN statistics in one read of x or two.
    pub bn_stats: BnStats,
    /// Where a GPU run finishes its views.
    pub view_finish: ViewFinish,
    /// How a GPU step's NaN guard holds back updates.
    pub nan_guard: NanGuard,
    /// A GPU step waits at the end of every phase, so that its phase times are GPU times
    /// (carp-bench's default; training's is off).
    pub phase_sync: Switch,
}

impl RunOptions {
    /// The defaults: the fastest measured path of each switch.
    pub const DEFAULT: RunOptions = RunOptions {
        fused_bn: Switch::On,
        recompute: Recompute::BnAndConv3,
        bf16_layout: Bf16Layout::Nhwc,
        tf32: Switch::On,
        cudnn_find: Switch::On,
        bn_stats: BnStats::OnePass,
        view_finish: ViewFinish::Gpu,
        nan_guard: NanGuard::Gated,
        phase_sync: Switch::Off,
    };

    /// `name=value` for every option, in declaration order (the form carp-bench prints).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        fn v<T: ValueEnum>(t: T) -> String {
            t.to_possible_value()
                .map(|p| p.get_name().to_string())
                .unwrap_or_default()
        }
        vec![
            ("fused_bn", v(self.fused_bn)),
            ("recompute", v(self.recompute)),
            ("bf16_layout", v(self.bf16_layout)),
            ("tf32", v(self.tf32)),
            ("cudnn_find", v(self.cudnn_find)),
            ("bn_stats", v(self.bn_stats)),
            ("view_finish", v(self.view_finish)),
            ("nan_guard", v(self.nan_guard)),
            ("phase_sync", v(self.phase_sync)),
        ]
    }

    /// One line: `fused_bn=on recompute=all ...`.
    pub fn summary(&self) -> String {
        self.pairs()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The options that differ from `other`, as `name: other's -> self's`.
    pub fn changes_from(&self, other: &RunOptions) -> Vec<String> {
        self.pairs()
            .into_iter()
            .zip(other.pairs())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((k, a), (_, b))| format!("{k}: {b} -> {a}"))
            .collect()
    }

    /// The options the environment sets, over `self`: the `CARP_*` variables of earlier
    /// versions, read through `env` (a lookup, so tests need not touch the process
    /// environment). An unknown value is an error naming the variable, the valid values and
    /// the flag that replaces it.
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> Result<RunOptions> {
        for r in RETIRED {
            if let Some(raw) = env(r.var) {
                if !r
                    .var_kept
                    .contains(&raw.trim().to_ascii_lowercase().as_str())
                {
                    bail!(Config, "{}={raw:?}: {}; unset it", r.var, r.why);
                }
            }
        }
        for spec in ENV_VARS {
            if let Some(raw) = env(spec.var) {
                (spec.apply)(&mut self, raw.trim()).map_err(|valid| {
                    crate::error::Error::Config(format!(
                        "{}={raw:?} is not a valid value: use {valid} (or the flag --{} of carp \
                         train and carp-bench)",
                        spec.var, spec.flag
                    ))
                })?;
            }
        }
        Ok(self)
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions::DEFAULT
    }
}

/// One environment variable of the fallback, and how its values map onto the options.
struct EnvVar {
    var: &'static str,
    flag: &'static str,
    /// Sets the option from the value, or returns the valid values.
    apply: fn(&mut RunOptions, &str) -> std::result::Result<(), String>,
}

/// A boolean variable: `1`/`on`/`true`/`yes` or `0`/`off`/`false`/`no`, or one of the flag's
/// value names.
fn env_choice<T: ValueEnum + Copy>(
    raw: &str,
    when_1: T,
    when_0: T,
) -> std::result::Result<T, String> {
    match raw.to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => return Ok(when_1),
        "0" | "off" | "false" | "no" => return Ok(when_0),
        _ => {}
    }
    if let Ok(t) = T::from_str(raw, true) {
        return Ok(t);
    }
    let names: Vec<String> = T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
        .collect();
    Err(format!("1 or 0 (or {})", names.join(", ")))
}

/// A variable of two values, `1` meaning `when_1` and `0` meaning `when_0` (see [`env_choice`]).
macro_rules! env_bool {
    ($var:literal, $flag:literal, $field:ident, $when_1:expr, $when_0:expr) => {
        EnvVar {
            var: $var,
            flag: $flag,
            apply: |o, v| {
                o.$field = env_choice(v, $when_1, $when_0)?;
                Ok(())
            },
        }
    };
}

/// The legacy variables, each with its old meaning of `1` and `0`.
const ENV_VARS: &[EnvVar] = &[
    env_bool!(
        "CARP_FUSED_BN",
        "fused-bn",
        fused_bn,
        Switch::On,
        Switch::Off
    ),
    EnvVar {
        var: "CARP_RECOMPUTE",
        flag: "recompute",
        apply: |o, v| {
            o.recompute = match v.to_ascii_lowercase().as_str() {
                "1" | "all" => Recompute::BnAndConv3,
                "bn" => Recompute::BnOutputs,
                "0" | "off" | "none" => Recompute::Nothing,
                _ => return Err("all (or 1), bn, none (or 0)".into()),
            };
            Ok(())
        },
    },
    env_bool!(
        "CARP_NHWC",
        "bf16-layout",
        bf16_layout,
        Bf16Layout::Nhwc,
        Bf16Layout::Nchw
    ),
    env_bool!("CARP_TF32", "tf32", tf32, Switch::On, Switch::Off),
    env_bool!(
        "CARP_CUDNN_FIND",
        "cudnn-find",
        cudnn_find,
        Switch::On,
        Switch::Off
    ),
    env_bool!(
        "CARP_BN_TWO_PASS",
        "bn-stats",
        bn_stats,
        BnStats::TwoPass,
        BnStats::OnePass
    ),
    env_bool!(
        "CARP_GPU_AUG",
        "view-finish",
        view_finish,
        ViewFinish::Gpu,
        ViewFinish::Cpu
    ),
    env_bool!(
        "CARP_STEP_SYNC",
        "nan-guard",
        nan_guard,
        NanGuard::Sync,
        NanGuard::Gated
    ),
    env_bool!(
        "CARP_PHASE_SYNC",
        "phase-sync",
        phase_sync,
        Switch::On,
        Switch::Off
    ),
];

/// The names of the environment variables the fallback reads, one per run-option flag.
pub fn env_var_names() -> Vec<&'static str> {
    ENV_VARS.iter().map(|e| e.var).collect()
}

/// An option of an earlier version that is gone, with the one behaviour left. A recorded value
/// (config.json, a checkpoint's config) is still read, so that an older run resumes, and
/// `--resume` reports one other than the behaviour left ([`retired_changes`]). Its environment
/// variable may still name the behaviour left; any other value is an error.
struct Retired {
    /// The recorded key.
    key: &'static str,
    /// The recorded value of the behaviour left.
    kept: &'static str,
    var: &'static str,
    /// The variable's values (lower case) that meant the behaviour left.
    var_kept: &'static [&'static str],
    why: &'static str,
}

const RETIRED: &[Retired] = &[Retired {
    key: "optimizer_state",
    kept: "device",
    var: "CARP_HOST_OPTIM",
    var_kept: &["0", "off", "false", "no", "device"],
    why: "the host optimizer path (--optimizer-state host) was removed: the training state \
          (parameters, gradient, momentum, teacher, BN statistics) always lives on the run device",
}];

/// The environment variables of retired options (still read, to refuse what is gone).
pub fn retired_env_var_names() -> Vec<&'static str> {
    RETIRED.iter().map(|r| r.var).collect()
}

/// The run-option flags of `carp train` and `carp-bench` (flattened into both). A flag beats
/// its environment variable, which beats the default.
#[derive(clap::Args, Clone, Debug, Default)]
#[command(
    next_help_heading = "Run options (equivalent ways to compute the step; recorded in the run)"
)]
pub struct RunOptionArgs {
    /// Fused BN + ReLU (+ residual add) ops in ResNets; off runs the separate ops (same values).
    /// Env fallback: CARP_FUSED_BN=0|1. [default: on]
    #[arg(long, value_name = "on|off")]
    pub fused_bn: Option<Switch>,
    /// What ResNet training recomputes in backward instead of keeping: all (BN outputs and
    /// conv3's output: least memory), bn (the BN outputs), none (fastest, most memory).
    /// Bit-identical values. Env: CARP_RECOMPUTE=all|bn|0. [default: all]
    #[arg(long, value_name = "all|bn|none")]
    pub recompute: Option<Recompute>,
    /// Layout of bf16 activations on a GPU: nhwc (channels-last, cuDNN's fastest) or nchw.
    /// Env: CARP_NHWC=1|0. [default: nhwc]
    #[arg(long, value_name = "nhwc|nchw")]
    pub bf16_layout: Option<Bf16Layout>,
    /// TF32 tensor-core math in f32 cuDNN convolutions (off: FMA only). Env: CARP_TF32=1|0.
    /// [default: on]
    #[arg(long, value_name = "on|off")]
    pub tf32: Option<Switch>,
    /// Choose cuDNN algorithms by timing them (once per shape; off: the heuristic's first
    /// choice, e.g. to keep profiles short). Env: CARP_CUDNN_FIND=1|0. [default: on]
    #[arg(long, value_name = "on|off")]
    pub cudnn_find: Option<Switch>,
    /// Channels-last BN statistics on a GPU in one read of x (shifted sums) or two.
    /// Env: CARP_BN_TWO_PASS=0|1. [default: one-pass]
    #[arg(long, value_name = "one-pass|two-pass")]
    pub bn_stats: Option<BnStats>,
    /// Where a GPU run finishes its views (colour, blur, solarize, normalize): gpu (kernels
    /// fed with u8 crops) or cpu (the loader threads). Env: CARP_GPU_AUG=1|0. [default: gpu]
    #[arg(long, value_name = "gpu|cpu")]
    pub view_finish: Option<ViewFinish>,
    /// How a GPU step's NaN guard holds back a non-finite step's updates: gated (a device-side
    /// verdict, one wait per step) or sync (a wait mid-step, row-naming prototype checks).
    /// Env: CARP_STEP_SYNC=0|1. [default: gated]
    #[arg(long, value_name = "gated|sync")]
    pub nan_guard: Option<NanGuard>,
    /// Wait for the GPU at the end of every phase of a step, so the per-phase times are GPU
    /// times (costs the overlap). Env: CARP_PHASE_SYNC=0|1. [default: off for carp train, on
    /// for carp-bench]
    #[arg(long, value_name = "on|off")]
    pub phase_sync: Option<Switch>,
}

impl RunOptionArgs {
    /// The options: the flags given, else the environment's `CARP_*` variables, else `base`.
    pub fn resolve_over(&self, base: RunOptions) -> Result<RunOptions> {
        let mut o = base.with_env(|k| std::env::var(k).ok())?;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { o.$f = v; } )* };
        }
        set!(
            fused_bn,
            recompute,
            bf16_layout,
            tf32,
            cudnn_find,
            bn_stats,
            view_finish,
            nan_guard,
            phase_sync
        );
        Ok(o)
    }

    /// [`Self::resolve_over`] the defaults.
    pub fn resolve(&self) -> Result<RunOptions> {
        self.resolve_over(RunOptions::DEFAULT)
    }
}

static CURRENT: RwLock<RunOptions> = RwLock::new(RunOptions::DEFAULT);

/// Makes `o` the options in force for everything this process builds and runs from now on.
pub fn install(o: RunOptions) {
    // A poisoned lock only means a panic while writing a Copy value: the value is whole.
    *CURRENT.write().unwrap_or_else(|e| e.into_inner()) = o;
}

/// Changes the options in force (tests and A/B drivers: `update(|o| o.tf32 = Switch::Off)`).
pub fn update(f: impl FnOnce(&mut RunOptions)) {
    let mut w = CURRENT.write().unwrap_or_else(|e| e.into_inner());
    f(&mut w);
}

/// The options in force ([`install`]; the defaults otherwise).
pub fn current() -> RunOptions {
    *CURRENT.read().unwrap_or_else(|e| e.into_inner())
}

/// Parses a JSON value recorded by a run (config.json's or a checkpoint's `run_options`). The
/// keys of retired options are dropped (their one behaviour left applies); any other unknown
/// key is refused.
pub fn from_recorded(v: &serde_json::Value) -> Result<RunOptions> {
    let mut current = v.clone();
    if let Some(m) = current.as_object_mut() {
        for r in RETIRED {
            m.remove(r.key);
        }
    }
    match serde_json::from_value(current) {
        Ok(o) => Ok(o),
        Err(e) => bail!(Config, "recorded run options {v}: {e}"),
    }
}

/// What a recorded `run_options` value set that is gone: `name: recorded -> the behaviour left
/// (why)` for each retired option recorded with another value.
pub fn retired_changes(v: &serde_json::Value) -> Vec<String> {
    RETIRED
        .iter()
        .filter_map(|r| {
            let got = v.get(r.key)?;
            let got = got.as_str().map_or_else(|| got.to_string(), str::to_string);
            (got != r.kept).then(|| format!("{}: {got} -> {} ({})", r.key, r.kept, r.why))
        })
        .collect()
}

/// `serde(deserialize_with)` for a recorded `run_options` field: [`from_recorded`].
pub fn deserialize_recorded<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<RunOptions, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    from_recorded(&v).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::env_of as env;

    #[test]
    fn every_legacy_variable_maps_its_old_meaning() {
        // The old readers: CARP_FUSED_BN, CARP_NHWC, CARP_TF32, CARP_CUDNN_FIND and
        // CARP_GPU_AUG turned a default-on path off with "0"; CARP_BN_TWO_PASS,
        // CARP_STEP_SYNC and CARP_PHASE_SYNC turned an alternative on with "1".
        let d = RunOptions::DEFAULT;
        let zeros = d
            .with_env(env(&[
                ("CARP_FUSED_BN", "0"),
                ("CARP_NHWC", "0"),
                ("CARP_TF32", "0"),
                ("CARP_CUDNN_FIND", "0"),
                ("CARP_GPU_AUG", "0"),
                ("CARP_RECOMPUTE", "0"),
            ]))
            .unwrap();
        assert_eq!(zeros.fused_bn, Switch::Off);
        assert_eq!(zeros.bf16_layout, Bf16Layout::Nchw);
        assert_eq!(zeros.tf32, Switch::Off);
        assert_eq!(zeros.cudnn_find, Switch::Off);
        assert_eq!(zeros.view_finish, ViewFinish::Cpu);
        assert_eq!(zeros.recompute, Recompute::Nothing);
        assert_eq!(zeros.changes_from(&d).len(), 6);
        let ones = d
            .with_env(env(&[
                ("CARP_BN_TWO_PASS", "1"),
                ("CARP_STEP_SYNC", " 1 "),
                ("CARP_PHASE_SYNC", "1"),
                ("CARP_RECOMPUTE", "bn"),
            ]))
            .unwrap();
        assert_eq!(ones.bn_stats, BnStats::TwoPass);
        assert_eq!(ones.nan_guard, NanGuard::Sync);
        assert_eq!(ones.phase_sync, Switch::On);
        assert_eq!(ones.recompute, Recompute::BnOutputs);
        // The flag's value names work in the variables too.
        let named = d.with_env(env(&[("CARP_NHWC", "nchw")])).unwrap();
        assert_eq!(named.bf16_layout, Bf16Layout::Nchw);
        // An unset environment leaves everything alone.
        assert_eq!(d.with_env(env(&[])).unwrap(), d);
        assert_eq!(env_var_names().len(), 9);
    }

    /// `--optimizer-state` is gone: its variable may still say "device" (what remains) and
    /// refuses "host"; a run that recorded it still loads, and a resume reports "host".
    #[test]
    fn a_retired_option_still_reads_and_refuses_what_is_gone() {
        let d = RunOptions::DEFAULT;
        for ok in ["0", "off", "device", " 0 "] {
            assert_eq!(d.with_env(env(&[("CARP_HOST_OPTIM", ok)])).unwrap(), d);
        }
        for bad in ["1", "host", "yes"] {
            let e = d
                .with_env(env(&[("CARP_HOST_OPTIM", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("CARP_HOST_OPTIM") && e.contains("removed"),
                "{e}"
            );
            assert!(e.contains("unset it"), "{e}");
        }
        let old = serde_json::json!({"tf32": "off", "optimizer_state": "host"});
        let o = from_recorded(&old).unwrap();
        assert_eq!(o.changes_from(&d), vec!["tf32: on -> off"]);
        let gone = retired_changes(&old);
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert!(
            gone[0].starts_with("optimizer_state: host -> device ("),
            "{gone:?}"
        );
        assert!(retired_changes(&serde_json::json!({"optimizer_state": "device"})).is_empty());
        assert!(retired_changes(&serde_json::to_value(d).unwrap()).is_empty());
        // The same through a config's field.
        #[derive(Deserialize)]
        struct Cfg {
            #[serde(deserialize_with = "deserialize_recorded")]
            run_options: RunOptions,
        }
        let c: Cfg = serde_json::from_value(serde_json::json!({"run_options": old})).unwrap();
        assert_eq!(c.run_options, o);
        assert!(
            serde_json::from_value::<Cfg>(serde_json::json!({"run_options": {"tf33": "off"}}))
                .is_err()
        );
    }

    #[test]
    fn an_unknown_value_is_an_error_listing_the_valid_ones() {
        let e = RunOptions::DEFAULT
            .with_env(env(&[("CARP_NHWC", "maybe")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CARP_NHWC=\"maybe\""), "{e}");
        assert!(e.contains("nhwc, nchw"), "{e}");
        assert!(e.contains("--bf16-layout"), "{e}");
        let e = RunOptions::DEFAULT
            .with_env(env(&[("CARP_RECOMPUTE", "some")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bn, none"), "{e}");
        // Before the old parsers' silent defaults: "yes please" was "on" for CARP_FUSED_BN.
        assert!(RunOptions::DEFAULT
            .with_env(env(&[("CARP_FUSED_BN", "yes please")]))
            .is_err());
    }

    #[test]
    fn recorded_form_round_trips_and_names_the_flag_values() {
        let mut o = RunOptions::DEFAULT;
        o.recompute = Recompute::BnOutputs;
        o.bn_stats = BnStats::TwoPass;
        let v = serde_json::to_value(o).unwrap();
        assert_eq!(v["recompute"], "bn");
        assert_eq!(v["bn_stats"], "two-pass");
        assert_eq!(v["fused_bn"], "on");
        assert_eq!(from_recorded(&v).unwrap(), o);
        // Missing keys (a run recorded before an option existed) take the default; an unknown
        // key is refused.
        let partial = serde_json::json!({"tf32": "off"});
        let p = from_recorded(&partial).unwrap();
        assert_eq!(p.tf32, Switch::Off);
        assert_eq!(
            p.changes_from(&RunOptions::DEFAULT),
            vec!["tf32: on -> off"]
        );
        assert!(from_recorded(&serde_json::json!({"tf33": "off"})).is_err());
        // summary() lists every option once, in the recorded names.
        let s = RunOptions::DEFAULT.summary();
        for (k, _) in RunOptions::DEFAULT.pairs() {
            assert_eq!(s.matches(&format!("{k}=")).count(), 1, "{s}");
            assert!(v.get(k).is_some(), "{k} not serialized");
        }
    }
}
