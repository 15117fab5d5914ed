"""Test helpers shared by the PEFT test modules."""

import dataclasses

import jax
import numpy as np


class RecordedMasks:
    """A method whose dropout keep masks (``jax.random.bernoulli`` draws) are recorded by module name.

    ``jax.random.bernoulli`` is wrapped for the test; each hook call notes the module it runs for.
    """

    def __init__(self, method, monkeypatch):
        self.method, self.masks, self._at = method, {}, []
        real = jax.random.bernoulli

        def bernoulli(key, p=0.5, shape=None, **kwargs):
            out = real(key, p, shape, **kwargs)
            assert self._at, "a dropout mask drawn outside a hook"
            assert self._at[-1] not in self.masks, f"two masks for {self._at[-1]}"
            self.masks[self._at[-1]] = np.asarray(out)
            return out

        monkeypatch.setattr(jax.random, "bernoulli", bernoulli)

    def hooks(self, peft_params, **kwargs):
        def named(fn):
            def hook(ctx, *args):
                self._at.append(ctx.name)
                try:
                    return fn(ctx, *args)
                finally:
                    self._at.pop()
            return hook

        return [dataclasses.replace(h, fn=named(h.fn)) for h in self.method.hooks(peft_params, **kwargs)]
