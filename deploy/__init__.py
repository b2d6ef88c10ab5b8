"""Deployment files and launchers (`python -m deploy.ray_serve`: aeserve on Ray Serve)."""
