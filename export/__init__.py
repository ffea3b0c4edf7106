"""byolkit export: a trained encoder -> a verified ONNX file (export.onnx) -> a Triton model
repository (export.triton). export.contract holds the names and metadata that serving and the app
share; it imports neither torch nor onnx."""
