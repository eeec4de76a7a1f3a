"""Walking a jaxpr and every jaxpr nested in it (scan/while/cond/pjit bodies, custom
derivatives), for tests that inspect what a program holds."""
from jax.extend import core as jcore


def nested(closed):
    """``(jaxpr, consts)`` of ``closed`` (a ClosedJaxpr) and of every jaxpr nested in
    its equations' parameters, depth first (``consts`` empty for an open Jaxpr)."""
    def visit_params(value):
        if isinstance(value, jcore.ClosedJaxpr):
            yield from walk(value.jaxpr, value.consts)
        elif isinstance(value, jcore.Jaxpr):
            yield from walk(value, ())
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from visit_params(v)

    def walk(jaxpr, consts):
        yield jaxpr, consts
        for eqn in jaxpr.eqns:
            for value in eqn.params.values():
                yield from visit_params(value)

    yield from walk(closed.jaxpr, closed.consts)
