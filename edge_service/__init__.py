"""The FedInspect edge agent: keeps a factory's images local, takes part in training
cycles by uploading features only, fine-tunes and gates the resulting model on its own
data, and serves predictions (with Grad-CAM heat maps) from the model it deployed.

Entry points: :func:`edge_service.main.create_app` and :func:`edge_service.main.run`.
"""
