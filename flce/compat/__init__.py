"""Entry points with the signatures of other fused cross-entropy libraries, so switching to flce
is a change of import. flce is exact: options that trade accuracy for speed elsewhere (gradient
filtering, accumulation dtypes, kernel choice) are accepted and ignored."""
