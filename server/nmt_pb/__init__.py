"""Code generated from protos/nmt/v1 by `python -m nmt.server.protogen`: do not edit."""
