"""byolkit export: a trained encoder -> a verified ONNX file (export.onnx) -> a Triton model
repository (export.triton). The names and metadata that serving and the app share are in
contract.deployment, which imports neither torch nor onnx."""
