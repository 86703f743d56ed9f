"""af_train's kernels: fused RoPE, rotary flash attention and the tiled multi-positive contrastive
loss in Triton (``kernels.rope``, ``kernels.rotary_attention``, ``kernels.mpc_loss``), the helpers they
share (``kernels.utils``), the one list of their GPU launchers (``kernels.autotune``), their PyTorch twins
(``kernels.reference``) and the one place that picks between them (``kernels.dispatch``).

Callers use ``kernels.dispatch``. Nothing is re-exported here: ``kernels.rotary_attention`` and
``kernels.mpc_loss`` name the submodules. Importing the package does not import Triton.
"""
