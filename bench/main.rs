//! carp-bench: measures a CARP training configuration.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "carp-bench",
    version,
    about = "Benchmark one CARP training configuration"
)]
struct Args {}

fn main() {
    let _ = Args::parse();
}
