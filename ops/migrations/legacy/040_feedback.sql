-- Override for pre-21 servers (everything else in legacy migrations is generated from
-- ../040_feedback.sql by sinks.legacy_sql.to_legacy). 18.16 cannot JOIN ... ON an aliased
-- FINAL table: it joins two subqueries USING request_id, with ANY strictness spelled out.
CREATE VIEW IF NOT EXISTS {db}.feedback_metrics AS
SELECT
    toDate(event_time) AS day,
    model,
    ifNull(experiment_id, '') AS experiment_id,
    ifNull(variant, '') AS variant,
    countIf(rating = 'THUMBS_UP') AS thumbs_up,
    countIf(rating = 'THUMBS_DOWN') AS thumbs_down
FROM (SELECT request_id, event_time, rating FROM {db}.feedback FINAL)
ANY INNER JOIN (SELECT request_id, model, experiment_id, variant FROM {db}.events FINAL) USING request_id
GROUP BY day, model, experiment_id, variant;
