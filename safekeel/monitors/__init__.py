"""Monitors: activation capture, linear probes and refusal directions, sparse autoencoders, runtime scoring."""
