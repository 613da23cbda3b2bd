//! carp's whole CPU training step against the official CARP code (github.com/sthalles/carp).
//!
//! tests/fixtures/official_parity.safetensors was written by scripts/official_parity.py, which
//! ran the official head, loss, random partition, LARS with its parameter groups, and
//! `main_carp.train_one_epoch` (the order within a step: forwards, loss, teacher EMA, backward,
//! LARS) for three steps on a small model, from a seeded initial state whose 1-d parameters
//! and BN running statistics are jittered (zero-init residual would leave the residual
//! branches without a gradient). The fixture holds that initial state, each step's views,
//! partition, lr, teacher momentum and weight decay, and after each step the loss terms, the
//! student, the teacher, the LARS momentum and both networks' BN running statistics. Here carp
//! takes the same state, views and partitions and its three steps are compared with the
//! official ones, quantity by quantity, after every step.

use std::collections::{BTreeMap, HashMap};

use carp::nn::head::HeadConfig;
use carp::nn::params::ParamStore;
use carp::nn::resnet::{BlockKind, ResNetConfig, Stem};
use carp::nn::ModelConfig;
use carp::ops::loss::random_partition;
use carp::testutil::randn_vec;
use carp::train::step::CarpState;
use carp::Tensor;
use safetensors::{Dtype, SafeTensors};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/official_parity.safetensors"
);
const STEPS: usize = 3;
const NB: usize = 64;

/// The script's model (its LAYERS, BASE_WIDTH, HIDDEN, OUT, K).
fn model() -> ModelConfig {
    ModelConfig {
        arch: "official-parity".into(),
        backbone: ResNetConfig {
            layers: vec![1, 1, 1],
            base_width: 8,
            stem: Stem::Cifar,
            block: BlockKind::Bottleneck,
        },
        head: HeadConfig {
            hidden: 64,
            out: 32,
            prototypes: 256,
        },
    }
}

// The metric (the script's `deviation`, so that its float32-vs-float64 floors are in these
// units). Per tensor: the largest elementwise |carp - official| beyond 4 eps |official| (2 to 4
// ulps of the stored value: each step stores the parameters in f32, which alone moves them by
// half an ulp), divided by a scale S of what the steps changed: for the student and the teacher
// the largest element of the official student's update so far, for the momentum its largest
// element, for BN running statistics their largest change so far. S is at least GROUP_FLOOR
// of the largest S of its quantity: a tensor that exact arithmetic leaves unchanged (the
// head's biases right before a train-mode BN get a zero gradient, so only rounding noise moves
// their momentum) is "unmoved" and compared on its group's scale, with its own tolerance.
const STORE_ULPS: f64 = 4.0;
const GROUP_FLOOR: f64 = 1e-3;
const QUANTITIES: [&str; 5] = ["student", "teacher", "momentum", "student_bn", "teacher_bn"];

// The tolerances. The floors are the official code in f32 against itself in f64 (the same
// steps, partitions replayed), the largest over the three steps, as the script prints them and
// the fixture's metadata `f32_vs_f64` stores them; the test checks that each tolerance admits
// its floor. Each tolerance is 6 to 10 floors: carp and the official f32 each deviate from the
// exact step by about a floor, in their own directions.
//   loss terms (absolute)  floor 3.1e-7 (about an ulp of the consistency, 4.15)  tolerance 2e-6
//   student                floor 1.3e-6                                         tolerance 1e-5
//   teacher                floor 1.3e-7                                         tolerance 1e-6
//   LARS momentum          floor 3.6e-6                                         tolerance 3e-5
//   student, teacher BN    floor 1.4e-7                                         tolerance 1e-6
//   unmoved (the momentum of head.fc1.bias and head.fc2.bias, rounding noise on 1/1000 of
//   the largest momentum)  floor 5.3e-4                                         tolerance 5e-3
// carp measured 4.8e-7, 1.1e-6, 8.1e-8, 4.0e-6, 1.2e-7 and 5.4e-4 (the test prints them).
const TOL_LOSS: f64 = 2e-6;
const TOL: [f64; 5] = [1e-5, 1e-6, 3e-5, 1e-6, 1e-6];
const TOL_UNMOVED: f64 = 5e-3;

struct Fixture {
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i64s: HashMap<String, Vec<i64>>,
    meta: HashMap<String, String>,
}

impl Fixture {
    fn load() -> Fixture {
        let bytes = std::fs::read(FIXTURE).unwrap_or_else(|e| {
            panic!("{FIXTURE}: {e} (it is written by scripts/official_parity.py)")
        });
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (mut f32s, mut i64s) = (HashMap::new(), HashMap::new());
        for (name, view) in st.tensors() {
            match view.dtype() {
                Dtype::F32 => {
                    let v = view
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    f32s.insert(name, (view.shape().to_vec(), v));
                }
                Dtype::I64 => {
                    let v = view
                        .data()
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    i64s.insert(name, v);
                }
                other => panic!("{name}: unexpected dtype {other:?}"),
            }
        }
        Fixture { f32s, i64s, meta }
    }

    fn f32s(&self, key: &str) -> &[f32] {
        &self
            .f32s
            .get(key)
            .unwrap_or_else(|| panic!("the fixture has no {key}"))
            .1
    }

    fn tensor(&self, key: &str) -> Tensor {
        let (shape, v) = &self.f32s[key];
        Tensor::from_vec(v.clone(), shape).unwrap()
    }

    /// `prefix` + every entry of `store`, by name; the fixture must have exactly these.
    fn read_store(&self, prefix: &str, store: &ParamStore) -> BTreeMap<String, Vec<f32>> {
        let n = self.f32s.keys().filter(|k| k.starts_with(prefix)).count();
        assert_eq!(
            n,
            store.len(),
            "{prefix}*: fixture and carp differ in names"
        );
        store
            .entries
            .iter()
            .map(|e| {
                let key = format!("{prefix}{}", e.name);
                let (shape, v) = self
                    .f32s
                    .get(&key)
                    .unwrap_or_else(|| panic!("the fixture has no {key}"));
                assert_eq!(shape, &e.shape, "{key}");
                (e.name.clone(), v.clone())
            })
            .collect()
    }

    /// The official state after step k.
    fn snapshot(&self, k: usize, like: &CarpState) -> Snapshot {
        let l = self.f32s(&format!("step{k}.loss"));
        let stores = QUANTITIES
            .iter()
            .map(|&q| {
                let store = if q.ends_with("_bn") {
                    &like.student.buffers
                } else {
                    &like.student.params
                };
                (q, self.read_store(&format!("step{k}.{q}."), store))
            })
            .collect();
        Snapshot {
            loss: [l[0], l[1]],
            stores,
        }
    }
}

/// One side's state after a step: [consistency, entropy] and, per quantity, tensors by name.
#[derive(Clone)]
struct Snapshot {
    loss: [f32; 2],
    stores: BTreeMap<&'static str, BTreeMap<String, Vec<f32>>>,
}

fn named(store: &ParamStore, data: &[f32]) -> BTreeMap<String, Vec<f32>> {
    store
        .entries
        .iter()
        .map(|e| (e.name.clone(), data[e.range()].to_vec()))
        .collect()
}

fn carp_snapshot(s: &CarpState, consistency: f32, entropy: f32) -> Snapshot {
    let stores = BTreeMap::from([
        ("student", named(&s.student.params, &s.student.params.data)),
        ("teacher", named(&s.teacher.params, &s.teacher.params.data)),
        ("momentum", named(&s.student.params, &s.lars.momentum_buf)),
        (
            "student_bn",
            named(&s.student.buffers, &s.student.buffers.data),
        ),
        (
            "teacher_bn",
            named(&s.teacher.buffers, &s.teacher.buffers.data),
        ),
    ]);
    Snapshot {
        loss: [consistency, entropy],
        stores,
    }
}

/// The fixture's initial state (student = teacher), carp's three steps on it, and the official
/// snapshots to compare them with.
struct Run {
    init_params: BTreeMap<String, Vec<f32>>,
    init_buffers: BTreeMap<String, Vec<f32>>,
    carp: Vec<Snapshot>,
    official: Vec<Snapshot>,
    fixture: Fixture,
}

fn run_carp() -> Run {
    let fx = Fixture::load();
    let hp = |k: usize| fx.f32s(&format!("step{k}.hparams")).to_vec();
    let wd = hp(0)[2];
    assert!(
        (0..STEPS).all(|k| hp(k)[2] == wd),
        "carp's weight decay is constant"
    );
    let mut state = CarpState::new(&model(), NB, wd, 0).unwrap();
    let init_params = fx.read_store("init.param.", &state.student.params);
    let init_buffers = fx.read_store("init.buffer.", &state.student.buffers);
    for net in [&mut state.student, &mut state.teacher] {
        for (name, v) in &init_params {
            let id = net.params.id(name).unwrap();
            net.params.view_mut(id).copy_from_slice(v);
        }
        for (name, v) in &init_buffers {
            let id = net.buffers.id(name).unwrap();
            net.buffers.view_mut(id).copy_from_slice(v);
        }
    }
    state.discard_device_state();
    let mut carp = Vec::new();
    let mut official = Vec::new();
    for k in 0..STEPS {
        let perm: Vec<u32> = fx.i64s[&format!("step{k}.perm")]
            .iter()
            .map(|&p| u32::try_from(p).unwrap())
            .collect();
        let (v1, v2) = (
            fx.tensor(&format!("step{k}.view1")),
            fx.tensor(&format!("step{k}.view2")),
        );
        let st = state
            .train_step_with_partition(&v1, &v2, perm, hp(k)[0], hp(k)[1])
            .unwrap();
        carp.push(carp_snapshot(&state, st.consistency, st.entropy));
        official.push(fx.snapshot(k, &state));
    }
    Run {
        init_params,
        init_buffers,
        carp,
        official,
        fixture: fx,
    }
}

/// One tensor's deviation and where it stands.
#[derive(Clone, Debug)]
struct Deviation {
    step: usize,
    quantity: &'static str,
    name: String,
    unmoved: bool,
    /// In the metric's units (see above).
    dev: f64,
    tol: f64,
}

impl Deviation {
    fn fails(&self) -> bool {
        self.dev > self.tol
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

/// S per tensor of `quantity` (see the metric above) and whether it was floored (unmoved).
fn scales(quantity: &str, want: &Snapshot, run: &Run) -> BTreeMap<String, (f64, bool)> {
    let raw: BTreeMap<String, f64> = match quantity {
        "student" | "teacher" => want.stores["student"]
            .iter()
            .map(|(n, v)| (n.clone(), max_abs_diff(v, &run.init_params[n])))
            .collect(),
        "momentum" => want.stores["momentum"]
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.iter().map(|x| x.abs() as f64).fold(0.0, f64::max),
                )
            })
            .collect(),
        _ => want.stores[quantity]
            .iter()
            .map(|(n, v)| (n.clone(), max_abs_diff(v, &run.init_buffers[n])))
            .collect(),
    };
    let floor = GROUP_FLOOR * raw.values().copied().fold(0.0, f64::max);
    raw.into_iter()
        .map(|(n, s)| (n, (s.max(floor), s < floor)))
        .collect()
}

/// Every tensor's deviation of `got` from the official snapshot `want` after step `step`
/// (the loss terms as the tensor "loss" of quantity "loss").
fn compare(step: usize, got: &Snapshot, want: &Snapshot, run: &Run) -> Vec<Deviation> {
    let mut out = vec![Deviation {
        step,
        quantity: "loss",
        name: "consistency, entropy".into(),
        unmoved: false,
        dev: max_abs_diff(&got.loss, &want.loss),
        tol: TOL_LOSS,
    }];
    for (qi, &q) in QUANTITIES.iter().enumerate() {
        let sc = scales(q, want, run);
        for (name, w) in &want.stores[q] {
            let g = &got.stores[q][name];
            let excess = g
                .iter()
                .zip(w)
                .map(|(&a, &b)| {
                    let (a, b) = (a as f64, b as f64);
                    ((a - b).abs() - STORE_ULPS * f32::EPSILON as f64 * b.abs()).max(0.0)
                })
                .fold(0.0, f64::max);
            let (s, unmoved) = sc[name];
            out.push(Deviation {
                step,
                quantity: q,
                name: name.clone(),
                unmoved,
                dev: excess / s,
                tol: if unmoved { TOL_UNMOVED } else { TOL[qi] },
            });
        }
    }
    out
}

fn compare_all(run: &Run, carp: &[Snapshot]) -> Vec<Deviation> {
    (0..STEPS)
        .flat_map(|k| compare(k, &carp[k], &run.official[k], run))
        .collect()
}

/// The largest deviation per (quantity, unmoved), over steps and tensors.
fn worst(devs: &[Deviation]) -> BTreeMap<(&'static str, bool), Deviation> {
    let mut w: BTreeMap<(&'static str, bool), Deviation> = BTreeMap::new();
    for d in devs {
        let e = w
            .entry((d.quantity, d.unmoved))
            .or_insert_with(|| d.clone());
        if d.dev > e.dev {
            *e = d.clone();
        }
    }
    w
}

#[test]
fn carp_matches_the_official_step() {
    let run = run_carp();
    assert_eq!(
        run.fixture.meta.get("official_commit").map(String::as_str),
        Some("c9b068b4bbf4978520617baf9f3277f7098f1596")
    );
    let devs = compare_all(&run, &run.carp);
    for ((q, unmoved), d) in worst(&devs) {
        eprintln!(
            "{q}{}: worst {:.3e} (step {}, {}), tolerance {:.1e}",
            if unmoved { " (unmoved)" } else { "" },
            d.dev,
            d.step,
            d.name,
            d.tol
        );
    }
    let failed: Vec<_> = devs.iter().filter(|d| d.fails()).collect();
    assert!(
        failed.is_empty(),
        "carp deviates from the official step: {failed:#?}"
    );
}

/// The tolerance of a floor in the fixture's metadata ("loss", "student", "momentum
/// (unmoved)", ...).
fn tolerance_of(key: &str) -> f64 {
    if key == "loss" {
        return TOL_LOSS;
    }
    if key.ends_with(" (unmoved)") {
        return TOL_UNMOVED;
    }
    let qi = QUANTITIES
        .iter()
        .position(|&q| q == key)
        .unwrap_or_else(|| panic!("the fixture has a floor for {key:?}, which the test lacks"));
    TOL[qi]
}

#[test]
fn each_tolerance_admits_the_official_f32_vs_f64_floor() {
    let fx = Fixture::load();
    let floors: Vec<BTreeMap<String, f64>> = serde_json::from_str(&fx.meta["f32_vs_f64"]).unwrap();
    assert_eq!(floors.len(), STEPS);
    for (k, row) in floors.iter().enumerate() {
        assert!(row.contains_key("student") && row.contains_key("momentum (unmoved)"));
        for (key, &floor) in row {
            let tol = tolerance_of(key);
            assert!(
                floor <= tol,
                "step {k}, {key}: the official code's own f32-vs-f64 deviation {floor:e} exceeds the tolerance {tol:e}"
            );
        }
    }
}

/// The f32 values either side of b + allowance: the largest within it and the smallest beyond
/// it. (Within by a hair less, so that the f64 rounding of the metric cannot tip it over.)
fn straddle(b: f32, allowance: f64) -> (f32, f32) {
    let within = |x: f32| x as f64 - b as f64 <= allowance * (1.0 - 1e-9);
    let mut x = (b as f64 + allowance) as f32;
    while !within(x) {
        x = x.next_down();
    }
    while within(x.next_up()) {
        x = x.next_up();
    }
    (x, x.next_up())
}

/// The comparison tells every quantity apart: carp's result with one element of one tensor
/// (the largest in magnitude) moved just beyond its tolerance fails on that tensor alone, at
/// every step, for every tensor of the loss terms, student, teacher, momentum and both BN
/// statistics; moved to the edge of the tolerance, it passes.
#[test]
fn one_element_just_beyond_its_tolerance_fails_that_quantity_alone() {
    let run = run_carp();
    let check = |k: usize, got: &Snapshot, q: &str, name: &str, beyond: bool| {
        let failed: Vec<_> = compare(k, got, &run.official[k], &run)
            .into_iter()
            .filter(Deviation::fails)
            .collect();
        if beyond {
            assert!(
                failed.len() == 1 && failed[0].quantity == q && failed[0].name == name,
                "step {k}, {q} {name} just beyond its tolerance: {failed:#?}"
            );
        } else {
            assert!(
                failed.is_empty(),
                "step {k}, {q} {name} at its tolerance: {failed:#?}"
            );
        }
    };
    let mut caught = BTreeMap::new();
    for k in 0..STEPS {
        let want = &run.official[k];
        for t in 0..2 {
            let (within, beyond) = straddle(want.loss[t], TOL_LOSS);
            for (v, out) in [(within, false), (beyond, true)] {
                let mut got = run.carp[k].clone();
                got.loss[t] = v;
                check(k, &got, "loss", "consistency, entropy", out);
            }
            *caught.entry("loss").or_insert(0) += 1;
        }
        for (qi, &q) in QUANTITIES.iter().enumerate() {
            let sc = scales(q, want, &run);
            for (name, w) in &want.stores[q] {
                let (s, unmoved) = sc[name];
                let tol = if unmoved { TOL_UNMOVED } else { TOL[qi] };
                let i = (0..w.len())
                    .max_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()))
                    .unwrap();
                let allowance = tol * s + STORE_ULPS * f32::EPSILON as f64 * w[i].abs() as f64;
                let (within, beyond) = straddle(w[i], allowance);
                for (v, out) in [(within, false), (beyond, true)] {
                    let mut got = run.carp[k].clone();
                    got.stores.get_mut(q).unwrap().get_mut(name).unwrap()[i] = v;
                    check(k, &got, q, name, out);
                }
                *caught.entry(q).or_insert(0) += 1;
            }
        }
    }
    eprintln!("perturbations caught, per quantity: {caught:?}");
    assert_eq!(caught.len(), 1 + QUANTITIES.len());
}

/// The hook replays a step exactly: given the partition the step would have drawn, it is
/// the drawn step bit for bit, and it leaves the partition RNG where it was; a partition that
/// is not a permutation of 0..K is refused before anything changes.
#[test]
fn a_given_partition_is_the_drawn_step() {
    let (n, s) = (4, 8);
    let v1 = Tensor::from_vec(randn_vec(n * 3 * s * s, 1), &[n, 3, s, s]).unwrap();
    let v2 = Tensor::from_vec(randn_vec(n * 3 * s * s, 2), &[n, 3, s, s]).unwrap();
    let mut drawn = CarpState::new(&model(), NB, 1e-3, 5).unwrap();
    let mut given = drawn.try_clone().unwrap();
    let perm = random_partition(256, &mut drawn.partition_rng.clone());
    let rng_before = given.partition_rng.clone();

    let mut bad = perm.clone();
    bad[1] = bad[0];
    let err = given
        .train_step_with_partition(&v1, &v2, bad, 0.5, 0.5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a permutation"), "{err}");
    assert_eq!(given.step, 0);
    assert!(given
        .train_step_with_partition(&v1, &v2, perm[..255].to_vec(), 0.5, 0.5)
        .is_err());

    let a = drawn.train_step(&v1, &v2, 0.5, 0.5).unwrap();
    let b = given
        .train_step_with_partition(&v1, &v2, perm, 0.5, 0.5)
        .unwrap();
    assert_eq!((a.loss, a.consistency), (b.loss, b.consistency));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&drawn.student.params.data),
        bits(&given.student.params.data)
    );
    assert_eq!(
        bits(&drawn.teacher.params.data),
        bits(&given.teacher.params.data)
    );
    assert_eq!(
        bits(&drawn.lars.momentum_buf),
        bits(&given.lars.momentum_buf)
    );
    assert_eq!(
        bits(&drawn.student.buffers.data),
        bits(&given.student.buffers.data)
    );
    assert_eq!(given.step, 1);
    let next = |r: &rand_chacha::ChaCha8Rng| random_partition(256, &mut r.clone());
    assert_eq!(next(&given.partition_rng), next(&rng_before));
    assert_ne!(next(&drawn.partition_rng), next(&rng_before));
}
