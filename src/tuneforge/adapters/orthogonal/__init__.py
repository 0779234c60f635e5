"""Orthogonal and reflection methods: OFT, BOFT, ETHER, HRA."""
