"""Code generated from protos/kserve/v2 by `python -m server.protogen`: do not edit."""
