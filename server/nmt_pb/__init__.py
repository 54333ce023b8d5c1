"""Code generated from protos/nmt/v1 by `python -m server.protogen`: do not edit."""
