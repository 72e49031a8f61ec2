"""Adapters that let users of other training code call the fused losses with that code's own interface.

    open_clip   ``ClipLoss``: open_clip's ClipLoss (constructor, call and distributed flags) over ``mk.info_nce``;
                ``SigLipLoss``: open_clip's SigLipLoss (constructor, call, every dist_impl) over ``mk.sigmoid_loss``

Nothing in the core imports this package, and no adapter imports the package it mirrors: they take the same
arguments and return the same values, so the other library need not be installed.
"""
