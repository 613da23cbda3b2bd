//! Networks: the flat parameter store, ResNet (torchvision layout), the projection head and
//! the weight-normalized prototypes.

pub mod head;
pub mod model;
pub mod params;
pub mod resnet;

pub use model::{ModelConfig, Network};
