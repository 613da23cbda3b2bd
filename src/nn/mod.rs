//! Networks: the flat parameter store, ResNet (torchvision layout), the projection head and
//! the weight-normalized prototypes.

pub mod params;
