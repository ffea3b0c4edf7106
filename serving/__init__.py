"""byolkit serving: the embedding endpoint (Triton's HTTP/gRPC protocol) and its client.

    python -m serving.server --model model.onnx|REPO     the server (serving/server.py)
    serving.client.EmbeddingClient                        the client, also in process (serving/client.py)

Light to import: nothing here pulls in torch.
"""
