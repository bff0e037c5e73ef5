-- A session's clean channel time in milliseconds under rule clean-v1, recomputed from
-- its stored features ($1: the session id). Each clean window counts the samples it
-- adds beyond the window before it: all of window 0, then the hop, at most the window.
SELECT coalesce(sum(round(
           least(window_samples,
                 CASE WHEN window_index = 0 THEN window_samples
                      ELSE window_start_sample / window_index END)
           * 1000.0 / sample_rate_hz)), 0)::bigint
  FROM features
 WHERE session_id = $1
   AND NOT flat
   AND clipped_fraction <= 0.01
   AND (line_noise_50hz IS NULL OR 10 * log(line_noise_50hz) <= 25)
   AND (line_noise_60hz IS NULL OR 10 * log(line_noise_60hz) <= 25)
