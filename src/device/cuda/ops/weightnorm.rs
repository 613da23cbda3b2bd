//! Launchers of `kernels/weightnorm.cu`: row norms and row normalization (the prototypes'
//! weight normalization).

use super::*;

impl CudaBackend {
    /// norms (rows,) = L2 norm of each row of v (rows, cols).
    pub fn row_norms(
        &self,
        v: &DeviceBuffer,
        rows: usize,
        cols: usize,
        norms: &mut DeviceBuffer,
    ) -> Result<()> {
        need("row_norms", "v", v, rows * cols)?;
        need("row_norms", "norms", norms, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (pv, pn, r, c) = (v.ptr(), norms.ptr(), i64_of(rows), i64_of(cols));
        launch!(
            self,
            "row_norms_f32",
            self.elementwise_cfg(rows * 32),
            pv,
            pn,
            r,
            c
        );
        Ok(())
    }

    /// w = v / norms row-wise; v, w (rows, cols).
    pub fn row_normalize(
        &self,
        v: &DeviceBuffer,
        norms: &DeviceBuffer,
        rows: usize,
        cols: usize,
        w: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "row_normalize";
        need(op, "v", v, rows * cols)?;
        need(op, "norms", norms, rows)?;
        need(op, "w", w, rows * cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (pv, pn, pw, r, c) = (v.ptr(), norms.ptr(), w.ptr(), i64_of(rows), i64_of(cols));
        launch!(
            self,
            "row_normalize_f32",
            self.elementwise_cfg(rows * cols),
            pv,
            pn,
            pw,
            r,
            c
        );
        Ok(())
    }

    /// dv = (dw - (dw . w) w) / ||v|| row-wise; dw, w, dv (rows, cols), norms (rows,).
    pub fn row_normalize_backward(
        &self,
        dw: &DeviceBuffer,
        w: &DeviceBuffer,
        norms: &DeviceBuffer,
        rows: usize,
        cols: usize,
        dv: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "row_normalize_backward";
        need(op, "dw", dw, rows * cols)?;
        need(op, "w", w, rows * cols)?;
        need(op, "norms", norms, rows)?;
        need(op, "dv", dv, rows * cols)?;
        if rows == 0 {
            return Ok(());
        }
        let (pdw, pw, pn, pdv) = (dw.ptr(), w.ptr(), norms.ptr(), dv.ptr());
        let (r, c) = (i64_of(rows), i64_of(cols));
        let cfg = self.elementwise_cfg(rows * 32);
        launch!(self, "row_normalize_bwd_f32", cfg, pdw, pw, pn, pdv, r, c);
        Ok(())
    }
}
