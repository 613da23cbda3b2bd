//! The carp CLI.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "carp",
    version,
    about = "Train ResNet50 with CARP (self-supervised), evaluate, pack data"
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
