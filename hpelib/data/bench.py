"""Render speed of SynthHeads: `python -m hpelib.data.bench [--size 128] [--n 500]`.

Prints images per second for each domain, rendering on the fly as training does (sampling,
drawing, reading back pixels and ids, measuring boxes; no PNG encoding), after a short warm-up
that creates the context and uploads the meshes and photographs. Also prints the CPU time per
image of this process (Mesa's rasteriser threads included), which other busy processes on the
machine distort less than the wall-clock rate.
"""

from __future__ import annotations

import argparse
import os
import time

from hpelib.data import render, synth


def bench_domain(domain: str, size: int, n: int, seed: int = 0) -> tuple[float, float]:
    """`(images per second, CPU milliseconds per image)` for `n` scenes of `domain` at `size` px."""
    renderer = synth.SceneRenderer(domain, size)
    for i in range(min(20, n)):  # warm-up: context, meshes, photographs, shader compilation
        renderer.render(synth.scene_rng(domain, "bench-warmup", seed, i))
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        renderer.render(synth.scene_rng(domain, "bench", seed, i))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return n / wall, 1e3 * cpu / n


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--n", type=int, default=500, help="scenes per domain")
    parser.add_argument("--domains", nargs="*", default=list(synth.DOMAINS), help="domains to time")
    args = parser.parse_args(argv)

    print(f"renderer: {render.check_egl()}, {args.size}px, {args.n} scenes per domain, "
          f"{os.cpu_count()} CPUs, LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS', '(Mesa default)')}")
    rates = {}
    for domain in args.domains:
        rate, cpu_ms = bench_domain(domain, args.size, args.n)
        rates[domain] = rate
        print(f"{domain:12s} {rate:8.0f} images/s   {cpu_ms:6.2f} CPU ms/image")
    return rates


if __name__ == "__main__":
    main()
