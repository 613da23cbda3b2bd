// Without the `cuda` feature there is nothing to build: nvcc is never needed.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
