"""The held-out quality report: `python -m training evaluate --store model_store` (`make quality`).

Every default model is run from its store artifacts (the ONNX files the service serves) on data that no
training or validation split reads, next to baselines that hold as many values as the model's latent:

* `baselines` - the bicubic thumbnail (images), PCA and NMF fitted on the training scans (4D-STEM);
* `artifacts` - a store version's ops as callables, and the model rebuilt from its manifest;
* `autoencoders`, `decoders` - one evaluation per family (held-out data, metrics, figures, goal);
* `cross_material` - the 4D-STEM autoencoder on another specimen (Au [110]) through the service's raw-detector
  preprocessing, and its PSNR drop from the training material;
* `report` - the whole store: the table, `quality.json`, the figures and each manifest's `metrics.heldout`.
"""
