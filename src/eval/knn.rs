//! Weighted k-NN on frozen features (SPEC.md "Evaluation"): L2-normalized features, cosine
//! similarity, the top-k neighbours of the training bank vote for their class with weight
//! exp(sim / T), T = 0.07; the prediction is the class with the largest total vote.

use rayon::prelude::*;

use crate::bail;
use crate::error::Result;

pub const KNN_TEMPERATURE: f32 = 0.07;
/// The k values reported; k = 20 is the headline number.
pub const KNN_KS: [usize; 4] = [10, 20, 100, 200];

/// Normalizes each row of a (n, d) matrix to unit L2 norm in place (zero rows stay zero).
pub fn l2_normalize_rows(x: &mut [f32], d: usize) {
    x.par_chunks_mut(d).for_each(|row| {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|v| *v /= n);
        }
    });
}

/// Top-1 accuracy (in [0, 1]) for each k in `ks`. `train`/`test` are (n, d) row-major features,
/// already L2-normalized; labels index classes `0..num_classes`. A k larger than the bank is
/// clamped to the bank size.
pub fn knn_top1(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    d: usize,
    num_classes: usize,
    ks: &[usize],
) -> Result<Vec<f64>> {
    let ntr = train_labels.len();
    let nte = test_labels.len();
    if d == 0 || train.len() != ntr * d || test.len() != nte * d {
        bail!(
            Shape,
            "knn: features do not match labels (d = {d}, {ntr} train, {nte} test rows)"
        );
    }
    if ntr == 0 || nte == 0 {
        bail!(Config, "knn needs a non-empty train bank and test set");
    }
    if let Some(&l) = train_labels
        .iter()
        .chain(test_labels)
        .find(|&&l| l as usize >= num_classes)
    {
        bail!(
            Config,
            "knn: label {l} out of range for {num_classes} classes"
        );
    }
    let kmax = ks.iter().copied().max().unwrap_or(1).min(ntr).max(1);
    // For each test row: similarities to the bank, partial sort to the top kmax, then vote.
    let correct: Vec<Vec<bool>> = test
        .par_chunks(d)
        .zip(test_labels.par_iter())
        .map(|(q, &y)| {
            let mut sims: Vec<(f32, u32)> = train
                .chunks(d)
                .zip(train_labels)
                .map(|(t, &l)| (q.iter().zip(t).map(|(a, b)| a * b).sum::<f32>(), l))
                .collect();
            // Ties broken by bank order, so results do not depend on the sort's internals.
            let cmp = |a: &(usize, &(f32, u32)), b: &(usize, &(f32, u32))| {
                b.1 .0.total_cmp(&a.1 .0).then(a.0.cmp(&b.0))
            };
            let mut idx: Vec<(usize, &(f32, u32))> = sims.iter().enumerate().collect();
            if kmax < idx.len() {
                idx.select_nth_unstable_by(kmax - 1, cmp);
                idx.truncate(kmax);
            }
            idx.sort_by(cmp);
            let top: Vec<(f32, u32)> = idx.iter().map(|(_, s)| **s).collect();
            sims.clear();
            ks.iter()
                .map(|&k| {
                    let mut votes = vec![0.0f64; num_classes];
                    for &(s, l) in top.iter().take(k.min(top.len())) {
                        votes[l as usize] += ((s / KNN_TEMPERATURE) as f64).exp();
                    }
                    let best = votes
                        .iter()
                        .enumerate()
                        .fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                        .0;
                    best as u32 == y
                })
                .collect()
        })
        .collect();
    Ok((0..ks.len())
        .map(|j| correct.iter().filter(|c| c[j]).count() as f64 / nte as f64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn_vec;

    /// Naive reference: full sort of all similarities in f64, vote over the first k.
    fn naive(
        train: &[f32],
        trl: &[u32],
        test: &[f32],
        tel: &[u32],
        d: usize,
        c: usize,
        k: usize,
    ) -> f64 {
        let mut ok = 0;
        for (q, &y) in test.chunks(d).zip(tel) {
            let mut s: Vec<(f64, usize)> = train
                .chunks(d)
                .enumerate()
                .map(|(i, t)| (q.iter().zip(t).map(|(a, b)| *a as f64 * *b as f64).sum(), i))
                .collect();
            s.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let mut votes = vec![0.0; c];
            for &(sim, i) in s.iter().take(k) {
                votes[trl[i] as usize] += (sim / 0.07).exp();
            }
            let best = (0..c).fold(0, |b, j| if votes[j] > votes[b] { j } else { b });
            ok += (best as u32 == y) as usize;
        }
        ok as f64 / tel.len() as f64
    }

    #[test]
    fn matches_naive_reference_on_clustered_data() {
        let (d, c, ntr, nte) = (8, 5, 300, 60);
        // Class centres plus noise: a task where k matters.
        let centres = randn_vec(c * d, 1);
        let noise = randn_vec((ntr + nte) * d, 2);
        let mut labels = Vec::new();
        let mut feats = Vec::new();
        for i in 0..ntr + nte {
            let l = (i * 7 % c) as u32;
            labels.push(l);
            for j in 0..d {
                feats.push(centres[l as usize * d + j] + 1.5 * noise[i * d + j]);
            }
        }
        l2_normalize_rows(&mut feats, d);
        let (tr, te) = feats.split_at(ntr * d);
        let (trl, tel) = labels.split_at(ntr);
        let ks = [1, 10, 20, 100, 200, 1000];
        let acc = knn_top1(tr, trl, te, tel, d, c, &ks).unwrap();
        for (j, &k) in ks.iter().enumerate() {
            let want = naive(tr, trl, te, tel, d, c, k.min(ntr));
            assert!((acc[j] - want).abs() < 1e-12, "k={k}: {} vs {want}", acc[j]);
        }
        // Clusters are separable enough that k-NN is far above chance (1/5).
        assert!(acc[1] > 0.6, "k=10 accuracy {}", acc[1]);
    }

    #[test]
    fn rejects_mismatched_inputs() {
        assert!(knn_top1(&[0.0; 6], &[0, 1], &[0.0; 3], &[0], 3, 2, &[1]).is_ok());
        assert!(knn_top1(&[0.0; 6], &[0, 1, 1], &[0.0; 3], &[0], 3, 2, &[1]).is_err());
        assert!(knn_top1(&[0.0; 6], &[0, 5], &[0.0; 3], &[0], 3, 2, &[1]).is_err());
    }
}
