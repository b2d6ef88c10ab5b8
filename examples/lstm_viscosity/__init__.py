"""LSTM viscosity regression from droplet videos through a running aeserve service.

    python -m examples.lstm_viscosity --url http://127.0.0.1:8000 --model v3-droplet-201

See `pipeline.py` for the steps and `regressors.py` for the models and baselines.
"""
