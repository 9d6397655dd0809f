"""Deployment: bundles (exported programs, integrity, provenance), predictions, the configs to retrain
(export.py), and the Ray Serve endpoint (serve.py). Import the submodule you need
(`from tally.deploy.export import export_bundle`): export needs torch, serve needs Ray Serve.
"""
