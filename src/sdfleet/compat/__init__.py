"""Wire formats of the seed (AWS "Stable Diffusion on Amazon EKS"), kept so its clients work unchanged.

- ``v1alpha1``: the A1111 payload with routing keys in ``alwayson_scripts``.
- ``v1alpha2``: ``{"task": {"metadata": {...}, "content": {...}}}``.
- ``sns``: SNS envelopes and the messages the seed's input Lambdas publish.
"""
