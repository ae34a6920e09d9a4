"""Backward of ops whose forward already computed the gradient ("fused" ops).

The forward kernels write d out / d input into a fresh buffer, with every
per-sample factor folded in.  The backward then only multiplies that buffer by
the incoming gradient g:

* In eager mode the buffer is owned by the autograd node alone, so it is scaled
  in place and handed out as the input's gradient: no new (B, N) allocation,
  and, on CPU, no pass at all when g is exactly 1 (the usual ``loss.backward()``;
  reading a CPU scalar costs no synchronisation).  The node then drops its
  reference, so a second backward through the same graph (``retain_graph=True``)
  raises a clear error instead of returning a gradient that ``.grad`` may have
  modified meanwhile.
* Under tracing (torch.compile, opcheck's AOT tests) the buffer is saved with
  ``save_for_backward`` and scaled out of place, which is what functional
  graphs need; Inductor fuses the multiply.
"""

import torch


def _eager(t):
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def save_grad_buffer(ctx, grad, *others):
    """Keep the fused gradient buffer (and small tensors ``others``) for backward."""
    ctx.grad_in_ctx = _eager(grad)
    if ctx.grad_in_ctx:
        ctx.grad_buffer = [grad]
        ctx.save_for_backward(*others)
    else:
        ctx.save_for_backward(grad, *others)
    # Unused output gradients arrive as None instead of materialised zeros: zeros
    # for the (B, N) gradient output would cost a full extra pass.
    ctx.set_materialize_grads(False)


def saved_others(ctx):
    saved = ctx.saved_tensors
    return saved if ctx.grad_in_ctx else saved[1:]


def scaled_grad(ctx, g, op_name):
    """The saved buffer times g: g is () for a reduced output, or (B,) per row."""
    if ctx.grad_in_ctx:
        if not ctx.grad_buffer:
            raise RuntimeError(
                f"{op_name}: backward ran twice through the same graph (retain_graph=True). "
                "The fused gradient buffer was handed to .grad the first time; recompute the "
                "loss for a second backward."
            )
        grad = ctx.grad_buffer.pop()
    else:
        grad = ctx.saved_tensors[0]
    if grad.numel() == 0:
        raise RuntimeError(
            f"{op_name}: backward called but the forward ran with compute_grad=False "
            "(no input required grad at call time)"
        )
    factor = g.to(torch.float32).reshape(-1, 1) if g.dim() == 1 else g.to(torch.float32).reshape(1, 1)
    if ctx.grad_in_ctx:
        if g.dim() == 0 and g.device.type == "cpu" and float(g) == 1.0:
            return grad
        return grad.mul_(factor)  # float32 multiply, one rounding to grad's dtype
    return (grad * factor).to(grad.dtype)


class _EagerFused(torch.autograd.Function):
    """Eager-mode shortcut around a registered op's autograd formula.

    Calls ``op`` below the Autograd dispatch key and reuses the op's own
    ``setup_context`` / ``backward``: the same math as the registered formula,
    minus torch.library's per-call Python bookkeeping (~30-40 us per call, which
    dominates launch-bound sizes).  torch.compile never sees this class:
    ``call`` uses the registered op directly while tracing.
    """

    @staticmethod
    def forward(ctx, op, setup_context, backward, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        ctx.lct_backward = backward
        ctx.lct_op = str(op)  # which op ran (introspection: out.grad_fn.lct_op)
        return output

    @staticmethod
    def backward(ctx, *grads):
        prev = ctx.needs_input_grad
        try:
            ctx.needs_input_grad = prev[3:]
            result = ctx.lct_backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = prev
        return (None, None, None, *result)


# torch.autograd.Function.apply's C++ core, bound to _EagerFused.  The Python
# wrapper Function.apply adds a generic pass over every argument (to unwrap
# functorch wrappers left over from a finished transform), a few microseconds
# per call at small sizes.  `call` takes the core directly when no functorch
# transform is active and every argument is a plain tensor (no functorch
# wrapper, no __torch_function__ subclass), None or a Python scalar.
_CORE_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _EagerFused)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain(args):
    # identity tests, not tuple membership: this runs on every eager call (~0.1 us an
    # argument at the demo's sizes)
    tensor, parameter = torch.Tensor, torch.nn.Parameter
    for a in args:
        t = type(a)
        if t is tensor or t is parameter:
            if _is_wrapped(a):
                return False
        elif not (a is None or t is float or t is int or t is bool):
            return False
    return True


def eager_call(*args):
    """Whether a call on ``args`` is an eager call on plain arguments, in any grad mode:
    no tracing (torch.compile), no functorch transform, every argument a plain tensor,
    None or a Python scalar (see _plain).  Such calls may use an op whose autograd
    node is in C++: under no_grad it runs its forward alone, without the Python
    autograd kernel that torch.library registers for a Python formula (about 4 us per
    call at the demo's sizes, measured 2026-12-02)."""
    return (not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and _plain(args))


def eager_autograd(*args):
    """Whether a call on ``args`` is an eager call that autograd records, on plain
    arguments: grad mode on and :func:`eager_call`."""
    return torch.is_grad_enabled() and eager_call(*args)


def call(op, setup_context, backward, *args):
    """Run a fused op with autograd: the registered formula under tracing, the
    equivalent _EagerFused path in eager mode."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return op(*args)
    if not eager_autograd(*args):  # a functorch transform or a wrapped/subclass argument
        return _EagerFused.apply(op, setup_context, backward, *args)
    return _CORE_APPLY(op, setup_context, backward, *args)
