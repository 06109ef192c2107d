"""medray: train healthcare deep-learning models with Ray Train, serve them with Ray Serve.

The package holds everything jobs and serving share: data readers (`medray.data`), fitted
preprocessing (`medray.preprocessing`), models (`medray.models`), the Ray Train job
(`medray.train`), model bundles (`medray.bundle`) and evaluation metrics (`medray.metrics`).
"""

__version__ = "0.1.0"
