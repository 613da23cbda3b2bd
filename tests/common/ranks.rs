//! The ranks of the data-parallel equivalence tests (tests/data_parallel.rs on the CPU,
//! tests/gpu_data_parallel.rs on a GPU): a global batch whose rows differ in statistics by
//! rank, each rank's shard of it, a run of STEPS steps on W thread ranks or one, and the
//! deviation between two runs' ends.

use std::sync::Arc;

use carp::device::collective::{Collective, ThreadGroup};
use carp::optim::schedule::{cosine_lr, teacher_momentum};
use carp::testutil::randn_vec;
use carp::train::step::{CarpState, Unsynced};
use carp::{Device, Tensor};

use super::small_model;

pub const B: usize = 16; // global batch
pub const STEPS: usize = 3;
pub const SEED: u64 = 5;
pub const LOCALS: usize = 2; // local views of the multi-crop variant

/// `views` views of a batch of B images (S x S), view-major (V B, 3, S, S). Row i of each view
/// comes from the quarter q = 4 i / B of the batch, whose pixels have mean q - 1.5 and standard
/// deviation 0.5 + 0.4 q: every rank's rows (of 2 or 4 ranks) have statistics far from the
/// global batch's, so per-rank batch norm would normalize visibly differently.
pub fn views(views: usize, s: usize, seed: u64) -> Vec<f32> {
    let per = 3 * s * s;
    let noise = randn_vec(views * B * per, seed);
    noise
        .chunks_exact(per)
        .enumerate()
        .flat_map(|(row, px)| {
            let q = (row % B) * 4 / B;
            let (mean, std) = (q as f32 - 1.5, 0.5 + 0.4 * q as f32);
            px.iter().map(move |&z| mean + std * z)
        })
        .collect()
}

/// Rank `rank`'s rows of each of the views in `v` (view-major, B rows each): rows
/// rank B/W .. (rank + 1) B/W of every view, as (views B/W, 3, S, S).
pub fn shard(v: &[f32], nviews: usize, s: usize, rank: usize, world: usize) -> Tensor {
    let (per, rows) = (3 * s * s, B / world);
    let mut out = Vec::with_capacity(nviews * rows * per);
    for view in 0..nviews {
        let start = (view * B + rank * rows) * per;
        out.extend_from_slice(&v[start..start + rows * per]);
    }
    Tensor::from_vec(out, &[nviews * rows, 3, s, s]).unwrap()
}

/// What a rank ends with: student, teacher, LARS momentum, student and teacher BN running
/// statistics, and the (loss, consistency, entropy) of each step.
#[derive(Clone, Debug, PartialEq)]
pub struct End {
    pub student: Vec<f32>,
    pub teacher: Vec<f32>,
    pub momentum: Vec<f32>,
    pub student_bn: Vec<f32>,
    pub teacher_bn: Vec<f32>,
    pub log: Vec<[f32; 3]>,
}

impl End {
    pub fn fields(&self) -> [(&'static str, Vec<f32>); 6] {
        [
            ("student", self.student.clone()),
            ("teacher", self.teacher.clone()),
            ("LARS momentum", self.momentum.clone()),
            ("student BN statistics", self.student_bn.clone()),
            ("teacher BN statistics", self.teacher_bn.clone()),
            ("loss terms", self.log.concat()),
        ]
    }

    pub fn bits(&self) -> Vec<Vec<u32>> {
        self.fields()
            .iter()
            .map(|(_, v)| v.iter().map(|x| x.to_bits()).collect())
            .collect()
    }
}

/// One rank's run on `device`: STEPS steps on its shard of each step's views (the whole batch
/// when `comm` is none). On a GPU the state is device-resident and copied home at the end.
pub fn rank_run(
    comm: Option<Arc<dyn Collective>>,
    multicrop: bool,
    unsynced: Unsynced,
    device: &Device,
) -> End {
    let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world_size()));
    let mut state = CarpState::new(&small_model(), 16, 1e-6, SEED).unwrap();
    if let Some(c) = comm {
        state = state.with_collective(c);
    }
    state.unsynced = unsynced;
    let mut log = Vec::new();
    for step in 0..STEPS {
        let globals = views(2, 12, 100 + step as u64);
        let on = |t: Tensor| t.to_device(device).unwrap();
        let (v1, v2) = (
            on(shard(&globals[..globals.len() / 2], 1, 12, rank, world)),
            on(shard(&globals[globals.len() / 2..], 1, 12, rank, world)),
        );
        let locals = multicrop.then(|| {
            on(shard(
                &views(LOCALS, 8, 200 + step as u64),
                LOCALS,
                8,
                rank,
                world,
            ))
        });
        let lr = cosine_lr(step, STEPS, 0, 1.0, 0.1);
        let m = teacher_momentum(step, STEPS, 0.9, 1.0);
        let st = state
            .train_step_multi(&v1, &v2, locals.as_ref(), lr, m)
            .unwrap();
        log.push([st.loss, st.consistency, st.entropy]);
    }
    if *device != Device::Cpu {
        state.move_to_host().unwrap();
    }
    End {
        student: state.student.params.data.clone(),
        teacher: state.teacher.params.data.clone(),
        momentum: state.lars.momentum_buf.clone(),
        student_bn: state.student.buffers.data.clone(),
        teacher_bn: state.teacher.buffers.data.clone(),
        log,
    }
}

/// Every rank's end of a run on `world` thread ranks on `device` (all on the same one), in
/// rank order.
pub fn run(world: usize, multicrop: bool, unsynced: Unsynced, device: &Device) -> Vec<End> {
    let handles: Vec<_> = ThreadGroup::ranks(world)
        .unwrap()
        .into_iter()
        .map(|c| {
            let device = device.clone();
            std::thread::spawn(move || rank_run(Some(c), multicrop, unsynced, &device))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The largest deviation of `got` from `want` over all fields, each relative to the field's
/// largest magnitude (parameters and statistics span orders of magnitude between fields, not
/// within one): max |got - want| / max |want|. Also names the worst field.
pub fn deviation(got: &End, want: &End) -> (f64, &'static str) {
    let mut worst = (0.0f64, "");
    for ((name, g), (_, w)) in got.fields().into_iter().zip(want.fields()) {
        assert_eq!(g.len(), w.len(), "{name}");
        let scale = w.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
        let dev = g
            .iter()
            .zip(&w)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()))
            / scale.max(1e-30);
        if dev > worst.0 {
            worst = (dev, name);
        }
    }
    worst
}
