"""What a benchmark run shows: the summary table and the chart (PNG, matplotlib)."""

from __future__ import annotations

PROVIDER_ORDER = ("eager", "compile", "stylegan2", "auto", "reference", "composite", "cpu", "cuda", "triton")


def _order(name: str) -> int:
    return PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _ms(p: dict) -> str:
    return f"{p['ms']:.3f}" if "ms" in p else "error"


def summary_table(rows: list[dict]) -> str:
    """One line per row: eager, compile and auto ms, the best fastgen backend and its speedups, its
    throughput against the machine's ceiling, peak memory (best / eager), error and the verdict."""
    head = (f"{'op':17s} {'shape':20s} {'layout':6s} {'pass':7s} {'eager ms':>9s} {'compile':>9s} "
            f"{'auto ms (backend)':>22s} {'best':>9s} {'x eager':>7s} {'x comp':>7s} {'throughput':>16s} "
            f"{'peak MiB best/eager':>19s} {'max err':>8s}  verdict")
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["providers"]
        eager, comp, auto = p.get("eager", {}), p.get("compile", {}), p.get("auto", {})
        best = p.get(r["best"], {}) if r["best"] else {}
        auto_cell = f"{_ms(auto)} ({auto.get('backend') or '-'})" if auto else "-"
        if best:
            unit = f"{best['tflops']:.2f} TFLOP/s" if "tflops" in best else f"{best['gbps']:.1f} GB/s"
            through = f"{unit} {100 * best['of_peak']:3.0f}%"
            speed = (f"{best.get('speedup_vs_eager', float('nan')):7.2f} "
                     f"{best.get('speedup_vs_compile', float('nan')):7.2f}")
            peak = f"{best['peak_mib']:.1f}/{eager.get('peak_mib', float('nan')):.1f}"
            err = f"{best['max_err']:.1e}"
        else:
            through, speed, peak, err = "-", f"{'-':>7s} {'-':>7s}", "-", "-"
        failed = [n for n, q in p.items() if not q.get("passed")]
        verdict = "PASS" if not failed else "FAIL: " + ", ".join(failed)
        lines.append(f"{r['op']:17s} {r['shape']['name']:20s} {r['layout']:6s} {r['pass']:7s} {_ms(eager):>9s} "
                     f"{_ms(comp):>9s} {auto_cell:>22s} {r['best'] or '-':>9s} {speed} {through:>16s} "
                     f"{peak:>19s} {err:>8s}  {verdict}")
    return ("median ms; best = the fastest fastgen backend that passed; x = its speedup over eager and "
            "compile; throughput: the least work the op must do (the unfused layers' FLOPs, so a rewrite that "
            "skips work can pass 100%; the fused minimum of bytes) per second, and its fraction of the measured "
            "ceiling (matmul TFLOP/s; copy GB/s of a tensor of the row's size); peak MiB one call holds; "
            "max err = |best - float64 oracle| of the output\n" + "\n".join(lines))


def chart(rows: list[dict], path: str, title: str) -> None:
    """Speedup over eager (top) and over torch.compile (bottom) per row (op, shape, layout, pass), one
    bar per provider; a provider that failed its check is drawn as a hatched stub at 0, no credit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    names = sorted({n for r in rows for n in r["providers"] if n != "eager"}, key=_order)
    labels = [f"{r['op']}\n{r['shape']['name']}\n{r['layout']} {r['pass']}" for r in rows]
    width = 0.8 / max(1, len(names))
    fig, axes = plt.subplots(2, 1, figsize=(max(10.0, 0.75 * len(rows) + 2), 9), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, base in zip(axes, ("eager", "compile")):
        for j, name in enumerate(names):
            if name == base:
                continue
            xs, hs, failed = [], [], []
            for i, r in enumerate(rows):
                p = r["providers"].get(name)
                if p is None:
                    continue
                x = i - 0.4 + (j + 0.5) * width
                if p.get(f"speedup_vs_{base}") is not None:
                    xs.append(x)
                    hs.append(p[f"speedup_vs_{base}"])
                elif not p.get("passed"):
                    failed.append(x)
            ax.bar(xs, hs, width, label=name, color=colors[j % len(colors)])
            if failed:
                ax.bar(failed, [0.05] * len(failed), width, color="none", edgecolor="red", hatch="xx")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
        ax.set_ylabel(f"speedup over {base} (x)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(ncol=len(names), fontsize=8, loc="upper left")
    axes[0].set_title(title, fontsize=10)
    axes[1].set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
