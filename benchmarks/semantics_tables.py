"""The README's "Do the directions mean anything?" tables from a saved ``bench_semantics --json`` report, so the
figures quoted are the ones measured, copied by no hand.

    .venv/bin/python -m benchmarks.bench_semantics --json > semantics.json
    .venv/bin/python -m benchmarks.semantics_tables semantics.json
"""
import argparse
import json
from pathlib import Path

LABELS = {"whitened": "whitened", "value": "value", "qkv-stack": "qkv-stack", "hspace-pca": "h-space PCA",
          "pair": "example pair", "pair-matched": "example pair, matched",
          "pair-conditional": "example pair, others projected out", "jacobian": "Jacobian (one face)",
          "jacobian-faces": "Jacobian ({jacobian_faces} faces)",
          "random-attention": "random (attention)", "random-hspace": "random (h-space)"}
FACTOR_NAMES = {"smile": "smile", "eye_open": "eye openness", "face_hue": "face hue", "hair_hue": "hair hue",
                "head_size": "head size", "x_position": "x position", "background": "background"}
PAIRS = (("pair_named", "example pair"), ("pair_matched_named", "matched pair"),
         ("pair_conditional_named", "others projected out"))


def label(method: str, report: dict) -> str:
    """The method's name in the tables, with the report's counts where it names one."""
    return LABELS.get(method, method).format(jacobian_faces=report.get("jacobian_faces", "several"))


def site_name(site: str) -> str:
    return "h-space" if site == "h_space" else site.replace(".1.transformer_blocks.0.attn1", "")


def number(value: float) -> str:
    """Two significant digits below 1, one decimal above (0.85, 0.4, 3.1, 12.0)."""
    return f"{value:.2g}" if abs(value) < 1 else f"{value:.1f}"


def times(value: float) -> str:
    return f"{number(value)}x"


def interval(low_high) -> str:
    return f"{number(low_high[0])} to {number(low_high[1])}"


def row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def header(*titles) -> list:
    return [row(titles), row(["---"] * len(titles))]


def methods_table(report: dict) -> list:
    lines = header("method", "best direction: factor moved", "effect / alpha", "purity (of the site's ceiling)",
                   "best / random best at its site (95% interval)", "median / random median (95% interval)",
                   "same factor on inverted faces / generated")
    for method, figures in report["methods"].items():
        best, random = figures["best"], method.startswith("random")
        index = "" if method.startswith("pair") else f" #{best['index']}"
        lines.append(row([
            label(method, report), f"{site_name(best['site'])}{index}: {FACTOR_NAMES[best['factor']]}",
            f"{best['effect']:.3f}",
            f"{best['purity']:.2f}" + ("" if random else f" ({figures['purity_vs_ceiling']:.2f})"),
            "" if random else f"{times(figures['best_ratio_vs_random'])} ({interval(figures['best_ratio_ci95'])})",
            "" if random else f"{times(figures['median_ratio_vs_random'])} ({interval(figures['median_ratio_ci95'])})",
            f"{figures['inverted_transfer']:.2f}"]))
    return lines


def sites_table(report: dict) -> list:
    methods = [m for m in report["methods"] if not m.startswith("random")]
    lines = header("site", *(label(m, report) for m in methods), "ceiling's largest effect (factor)")
    for site, figures in report["sites"].items():
        per_method = figures["methods"]
        factor, ceiling = max(figures["ceiling"].items(), key=lambda item: item[1]["effect"])
        lines.append(row([site_name(site), *(times(per_method[m]["ratio_vs_random"]) if m in per_method else ""
                                             for m in methods),
                          f"{ceiling['effect']:.2f} ({FACTOR_NAMES[factor]})"]))
    return lines


def named_table(report: dict) -> list:
    kinds = [(key, title) for key, title in PAIRS if report.get(key)]
    lines = header("factor", *(f"{title}: site, slope / alpha, vs random (95% interval), purity of ceiling"
                               for _, title in kinds), "the ceiling vs random at each one's site")
    for factor in report["pair_named"]:
        cells, ceilings = [], []
        for key, _ in kinds:
            named = report[key][factor]
            purity = "" if named["purity_vs_ceiling"] is None else f", {named['purity_vs_ceiling']:.2f}"
            cells.append(f"{site_name(named['site'])}, {named['named_slope']:.3g}, "
                         f"{times(named['ratio_vs_random'])} ({interval(named['ratio_ci95'])}){purity}")
            ceilings.append("-" if named["ceiling_ratio_vs_random"] is None
                            else times(named["ceiling_ratio_vs_random"]))
        lines.append(row([FACTOR_NAMES[factor], *cells, " / ".join(ceilings)]))
    return lines


def own_face_table(report: dict) -> list:
    lines = header("site", "faces", "own Jacobian's strongest / reference's strongest: median (range)",
                   "effect / alpha, Jacobian (median)", "reference", "effect / alpha, reference (median)")
    for site, figures in report["own_face_edits"].items():
        lines.append(row([site_name(site), str(figures["faces"]),
                          f"{times(figures['ratio_median'])} ({interval(figures['ratio_range'])})",
                          f"{figures['jacobian_effect_median']:.3f}", label(figures["reference"], report),
                          f"{figures['reference_effect_median']:.3f}"]))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="a file holding bench_semantics --json's output")
    report = json.loads(Path(parser.parse_args().report).read_text())
    for title, lines in (("methods", methods_table(report)), ("per site", sites_table(report)),
                         ("named directions", named_table(report)), ("own-face edits", own_face_table(report))):
        print(f"{title}:\n" + "\n".join(lines) + "\n")
    model = report["world_x0_psnr"], report["oracle_x0_psnr"]
    print(f"world x0 PSNR {model[0]} against the oracle's {model[1]}; sample redraw PSNR median "
          f"{report['sample_redraw_psnr_median']} dB, {report['noisy_samples']} of {report['samples']} noisy; "
          f"inversion {report['inversion_psnr']} dB, factors within {report['inversion_factor_error']}; "
          f"timings {report['timings_s']}; sweeps from cache {report['sweeps_from_cache']}")


if __name__ == "__main__":
    main()
