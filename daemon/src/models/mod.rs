//! Model manifests and the model store (being written).
