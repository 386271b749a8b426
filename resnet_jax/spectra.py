"""Singular values of a Jacobian from Jacobian-vector products alone (`jax.linearize`).

A block of a CIFAR ResNet maps a probe batch of 64 x 12 x 12 x 16 numbers to as many: its Jacobian
has 10^10 entries and is never formed. The Gram operator G (J J^T in the smaller of the input and
output spaces, J^T J otherwise) costs one forward-mode and one reverse-mode product per vector, and
its eigenvalues are the squared singular values of J:

- `lanczos` runs power iteration's Krylov-space form on G (the same products, with every
  iterate kept and orthogonalised): the power iterate lies in the Krylov space, so the largest Ritz
  value is never further from the top eigenvalue than power iteration's estimate after as many
  products, and the smallest bounds the bottom one from above.
- `rms_singular_value` is Hutchinson's trace estimate: sqrt(trace(G) / dim), the Frobenius norm
  over the square root of the dimension, which is what a random vector sees on average.

Ritz values lie inside the spectrum, so `top` never overestimates the largest singular value and
`bottom` never underestimates the smallest. G is formed in the function's dtype: in float32 the
smallest eigenvalues are resolved only to about 1e-6 of the largest, so a `bottom` below about
1e-3 `top` says "at most this", not "this".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# A Lanczos step whose new direction is this small, relative to the largest |alpha| so far, has
# found an invariant subspace (an identity map does at once): restart from a fresh random vector.
BREAKDOWN = 1e-5


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """Singular-value estimates of one Jacobian (see the module docstring for what each bounds)."""

    top: float
    bottom: float
    rms: float
    dim_in: int
    dim_out: int
    iterations: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def gram_operator(
    f: Callable[[jax.Array], jax.Array], x: jax.Array
) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array], int, int]:
    """(G v, |J^T v|^2 or |J v|^2, dim_in, dim_out) for the Jacobian of f at x, on flat vectors of
    the smaller space: G = J J^T when f does not grow the dimension, else J^T J."""
    y, jvp = jax.linearize(f, x)
    transpose = jax.linear_transpose(jvp, x)
    vjp = lambda u: transpose(u)[0]
    if y.size <= x.size:
        half = lambda u: vjp(u.reshape(y.shape)).ravel()
        apply = lambda u: jvp(half(u).reshape(x.shape)).ravel()
    else:
        half = lambda v: jvp(v.reshape(x.shape)).ravel()
        apply = lambda v: vjp(half(v).reshape(y.shape)).ravel()
    return apply, lambda v: jnp.sum(jnp.square(half(v))), x.size, y.size


def lanczos(
    matvec: Callable[[jax.Array], jax.Array], start: jax.Array, iterations: int, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(alphas, betas): the tridiagonal matrix of `iterations` Lanczos steps on the symmetric
    operator `matvec`, with full reorthogonalisation (twice, classical Gram-Schmidt) so that float32
    keeps the basis orthogonal. `iterations` must not exceed the dimension."""
    dim = start.size
    basis = jnp.zeros((iterations + 1, dim), start.dtype).at[0].set(start / jnp.linalg.norm(start))

    def orthogonalise(basis: jax.Array, w: jax.Array) -> jax.Array:
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def step(j: int, carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> tuple:
        basis, alphas, betas, scale = carry
        q = basis[j]
        w = matvec(q)
        alpha = jnp.vdot(q, w)
        scale = jnp.maximum(scale, jnp.abs(alpha))
        w = orthogonalise(basis, w)
        beta = jnp.linalg.norm(w)
        broke = beta <= BREAKDOWN * scale
        fresh = orthogonalise(basis, jax.random.normal(jax.random.fold_in(key, j), (dim,), start.dtype))
        following = jnp.where(broke, fresh / jnp.linalg.norm(fresh), w / jnp.where(broke, 1.0, beta))
        return (
            basis.at[j + 1].set(following),
            alphas.at[j].set(alpha),
            betas.at[j].set(jnp.where(broke, 0.0, beta)),
            scale,
        )

    zeros = jnp.zeros((iterations,), start.dtype)
    carry = (basis, zeros, zeros, jnp.zeros((), start.dtype))
    _, alphas, betas, _ = jax.lax.fori_loop(0, iterations, step, carry)
    return alphas, betas


def ritz_values(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """Eigenvalues of the Lanczos tridiagonal matrix, in float64, ascending."""
    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
    tridiagonal = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
    return np.linalg.eigvalsh(tridiagonal)


def rms_singular_value(
    half_norm_sq: Callable[[jax.Array], jax.Array], dim: int, probes: int, key: jax.Array, dtype: jnp.dtype
) -> jax.Array:
    """sqrt(trace(G) / dim) by Hutchinson's estimator over `probes` Rademacher vectors."""
    signs = jax.random.rademacher(key, (probes, dim), dtype)
    return jnp.sqrt(jnp.mean(jax.lax.map(half_norm_sq, signs)) / dim)


def estimate(
    f: Callable[[jax.Array], jax.Array], x: jax.Array, key: jax.Array, *, iterations: int, probes: int
) -> dict[str, jax.Array]:
    """The traceable part of `spectrum` (jit it): Lanczos coefficients and the RMS singular value."""
    matvec, half_norm_sq, dim_in, dim_out = gram_operator(f, x)
    dim = min(dim_in, dim_out)
    start_key, restart_key, probe_key = jax.random.split(key, 3)
    start = jax.random.normal(start_key, (dim,), x.dtype)
    alphas, betas = lanczos(matvec, start, min(iterations, dim), restart_key)
    return {
        "alphas": alphas,
        "betas": betas,
        "rms": rms_singular_value(half_norm_sq, dim, probes, probe_key, x.dtype),
    }


def read_spectrum(estimated: dict[str, jax.Array], dim_in: int, dim_out: int) -> Spectrum:
    """The host-side `Spectrum` of `estimate`'s arrays."""
    estimated = jax.device_get(estimated)
    values = np.clip(ritz_values(estimated["alphas"], estimated["betas"]), 0.0, None)
    return Spectrum(
        top=float(np.sqrt(values[-1])),
        bottom=float(np.sqrt(values[0])),
        rms=float(estimated["rms"]),
        dim_in=int(dim_in),
        dim_out=int(dim_out),
        iterations=len(values),
    )


def spectrum(
    f: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    key: jax.Array,
    *,
    iterations: int = 24,
    probes: int = 4,
) -> Spectrum:
    """Top, bottom and RMS singular values of the Jacobian of `f` at `x` (compiled once per call)."""
    estimated = jax.jit(lambda x, key: estimate(f, x, key, iterations=iterations, probes=probes))(x, key)
    out = jax.eval_shape(f, x)
    return read_spectrum(estimated, x.size, out.size)
