"""The torch-free engine: the bundle contract, ONNX Runtime sessions, step-wise search, text in/out.

Imported by export/, server/ and bench/; it imports none of them (nor torch).
"""
