"""Conditional directions: a set's directions with other directions' components projected out.

docs/math.md, section 'Projecting directions out'. To move one attribute without moving others
(InterFaceGAN's conditional manipulation), edit along the part of its direction n orthogonal to the
others' span: n' = P n / |P n|, P = I - Q Q^T with Q an orthonormal basis of the removed
directions at the site. For a pair's set (alpha in the pair's units, shift = alpha * gain * n) the
gain becomes gain * |P n|, so alpha 1 moves the site by the pair's mean difference less its
components along the removed directions. Other methods' gains (an operator's gain per unit shift)
do not carry over to n' and are dropped.
"""
import torch

from .directionset import DirectionError, DirectionSet, SiteDirections

KEPT_MINIMUM = 1e-3  # below this fraction of its length left, a direction lies in the removed span
RANK_TOLERANCE = 1e-6  # removed directions this close to the span of the others add nothing to it


def project_out(vectors: torch.Tensor, remove: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit rows [k, d] orthogonal to every row of ``remove`` [m, d], each row's kept length |P n| [k]), in
    float64 and returned in ``vectors``' dtype. Dependent rows of ``remove`` count once."""
    basis, values, _ = torch.linalg.svd(remove.double().T, full_matrices=False)
    basis = basis[:, values > RANK_TOLERANCE * values.max()]
    rows = vectors.double()
    projected = rows - (rows @ basis) @ basis.T
    kept = projected.norm(dim=1)
    return (projected / kept.clamp(min=torch.finfo(torch.float64).tiny)[:, None]).to(vectors.dtype), kept.to(
        vectors.dtype)


def label(dset: DirectionSet) -> str:
    """How a set is named where it was projected out: a pair's target name, else its method."""
    return str(dset.params.get("target", dset.method))


def project_out_set(dset: DirectionSet, remove: DirectionSet) -> tuple[DirectionSet, dict]:
    """(``dset`` with every direction of ``remove`` at each shared site projected out of each of its directions,
    {site: kept lengths [k]}). Sites ``remove`` lacks are kept as they are. Raises DirectionError (one line, naming
    ``directions`` or ``remove``) for sets of different models, no shared site, or a direction that lies in the
    removed span (nothing of it would remain)."""
    if remove.model != dset.model:
        raise DirectionError(f"remove: made for {remove.model['family']} ({remove.model['fingerprint']}) but "
                             f"directions are for {dset.model['family']} ({dset.model['fingerprint']}); use sets "
                             f"of the same model")
    shared = [site for site in dset.sites if site in remove.sites]
    if not shared:
        raise DirectionError(f"remove: has none of the directions' sites ({', '.join(dset.sites)}); it has "
                             f"{', '.join(remove.sites)}")
    pair = dset.params.get("alpha_unit") == "pair"
    sites, kept = {}, {}
    for site, directions in dset.sites.items():
        if site not in remove.sites:
            sites[site] = directions
            continue
        if remove.sites[site].width != directions.width:
            raise DirectionError(f"remove: {site} is {remove.sites[site].width} wide, the directions there "
                                 f"{directions.width}")
        vectors, kept[site] = project_out(directions.vectors, remove.sites[site].vectors)
        lost = (kept[site] < KEPT_MINIMUM).nonzero().flatten().tolist()
        if lost:  # each named, in order (which of several null ones keeps least is rounding's choice)
            shares = ", ".join(f"{float(kept[site][i]):.1e}" for i in lost)
            raise DirectionError(f"directions: {', '.join(f'#{i}' for i in lost)} at {site} "
                                 f"{'lies' if len(lost) == 1 else 'lie'} within remove's directions there (keeping "
                                 f"{shares} of {'its' if len(lost) == 1 else 'their'} length): nothing would remain")
        sites[site] = SiteDirections(vectors, directions.gains * kept[site] if pair else None)
    params = {**dset.params, "projected_out": [*dset.params.get("projected_out", []), label(remove)]}
    return DirectionSet(sites=sites, method=dset.method, model=dset.model, params=params), kept
