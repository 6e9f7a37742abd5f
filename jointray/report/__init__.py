"""Reports people read: the evaluation report (:mod:`jointray.report.evaluation`), its figures
(:mod:`jointray.report.figures`), the paired comparison of models (:mod:`jointray.report.comparison`)
and the HTML they are written to (:mod:`jointray.report.document`)."""
