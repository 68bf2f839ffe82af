"""Objectives that fail on purpose, shared by the training, checkpoint and distributed tests
(not collected by pytest; ``tests/`` is on ``sys.path`` under pytest and for the worker scripts)."""

from rank1_pyro import MixtureELBO


class StopAt(MixtureELBO):
    """Raises KeyboardInterrupt at call ``stop``: a stand-in for a crash (of every rank, in a
    distributed run, since each rank makes the same calls)."""

    def __init__(self, stop):
        super().__init__()
        self.calls, self.stop = 0, stop

    def loss_terms(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return super().loss_terms(*args, **kwargs)


class FailingELBO(MixtureELBO):
    """A MixtureELBO whose loss becomes NaN after ``fail_at`` calls."""

    def __init__(self, fail_at):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def loss_terms(self, *args, **kwargs):
        terms = super().loss_terms(*args, **kwargs)
        self.calls += 1
        if self.calls > self.fail_at:
            return terms._replace(loss=terms.loss * float("nan"))
        return terms


class InfiniteGradientELBO(MixtureELBO):
    """A finite loss whose gradient is NaN after ``fail_at`` calls: ``sqrt`` of a zero that depends on
    every parameter adds 0 to the loss and 0 · ∞ = NaN to each gradient."""

    def __init__(self, params, fail_at):
        super().__init__()
        self.params, self.calls, self.fail_at = list(params), 0, fail_at

    def loss_terms(self, *args, **kwargs):
        terms = super().loss_terms(*args, **kwargs)
        self.calls += 1
        if self.calls > self.fail_at:
            zero = sum((p * 0).sum() for p in self.params)
            return terms._replace(loss=terms.loss + zero.sqrt())
        return terms
