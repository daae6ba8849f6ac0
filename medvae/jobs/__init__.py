"""Leaf jobs that turn files into files: inspect, generate, embed, reconstruct, evaluate.

Nothing imports these modules except the CLI.
"""
