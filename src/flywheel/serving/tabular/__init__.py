"""The tabular data plane: `/v1/predict` (a raw ASGI hot path), `/v1/feedback`, the managed
platforms' contracts (SageMaker, Vertex AI, the Open Inference Protocol), request validation from
the model's schema, the prediction log and its sink, record ids, and `flywheel predict`."""
