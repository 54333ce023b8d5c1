"""Code generated from protos/kserve/v2 by `python -m nmt.server.protogen`: do not edit."""
