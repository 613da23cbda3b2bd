//! Launchers of `kernels/ema.cu`: the teacher's EMA, plain and gated by the step's verdict.

use super::*;

impl CudaBackend {
    /// teacher = m * teacher + (1 - m) * student over the flat buffers (same length).
    pub fn ema_update(
        &self,
        teacher: &mut DeviceBuffer,
        student: &DeviceBuffer,
        m: f32,
    ) -> Result<()> {
        let n = teacher.len32();
        if student.len32() != n {
            return Err(Error::Shape(format!(
                "ema_update: teacher has {n} values, student {}",
                student.len32()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (pt, ps, nn) = (teacher.ptr(), student.ptr(), i64_of(n));
        launch!(
            self,
            "ema_update_f32",
            self.elementwise_cfg(n),
            pt,
            ps,
            m,
            nn
        );
        Ok(())
    }

    /// `ema_update` gated by an i32 device flag (`step_ok`'s): nothing changes while it is 0.
    pub fn ema_update_gated(
        &self,
        teacher: &mut DeviceBuffer,
        student: &DeviceBuffer,
        m: f32,
        ok: &DeviceBuffer,
    ) -> Result<()> {
        let n = teacher.len32();
        if student.len32() != n {
            return Err(Error::Shape(format!(
                "ema_update_gated: teacher has {n} values, student {}",
                student.len32()
            )));
        }
        need("ema_update_gated", "ok", ok, 1)?;
        if n == 0 {
            return Ok(());
        }
        let (pt, ps, nn, pok) = (teacher.ptr(), student.ptr(), i64_of(n), ok.ptr());
        launch!(
            self,
            "ema_update_gated_f32",
            self.elementwise_cfg(n),
            pt,
            ps,
            m,
            nn,
            pok
        );
        Ok(())
    }
}
