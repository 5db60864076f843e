"""The Lua scripts that move a job record, each atomic in Redis. `JobStore` is their only caller.

Every script gets the job key as KEYS[1] and the job id as ARGV[1]. The indexes (leases, queued, published,
retries, callbacks, dead letter) and the blob are reached by name from inside the script: inferq runs against one
Redis (or a Sentinel-managed primary), never a cluster, so all keys live on the same server.

Fencing: `attempts` is the fencing token. A claim increments it and hands it to the attempt; renewing the lease,
starting the forward pass and writing the outcome all check that the record is still `running` under that token,
so an attempt whose lease lapsed (and whose job was taken over) can no longer write anything.
"""

from __future__ import annotations

from inferq.protocol.keys import (
    PREFIX,
    callbacks_key,
    dead_letter_key,
    done_channel,
    failures_key,
    job_key,
    leases_key,
    model_waiting_key,
    pass_key,
    published_key,
    queued_key,
    retries_key,
    stats_key,
    tenant_jobs_key,
    tenant_waiting_key,
    urgent_waiting_key,
)
from inferq.protocol.priority import Priority

DEFAULT_MAX_ATTEMPTS = 3
# CREATE's reply for a job refused because its model's queue is full (job ids are hex).
QUEUE_FULL = "!queue-full"
# Failed jobs per model per minute are kept this long for `inferq status`.
FAILURES_KEEP_S = 3600
_STATS_PREFIX = stats_key("")
_FAILURES_PREFIX = failures_key(0).removesuffix("0")

_PRELUDE = f"""
local J = KEYS[1]
local ID = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local LEASES, QUEUED, PUBLISHED = '{leases_key()}', '{queued_key()}', '{published_key()}'
local RETRIES, CALLBACKS, DEAD = '{retries_key()}', '{callbacks_key()}', '{dead_letter_key()}'
-- Fields a record never changes once created, read from it at most once per script.
local fixed = {{}}
local function field(name)
  local v = fixed[name]
  if v == nil then v = redis.call('HGET', J, name) or '' fixed[name] = v end
  return v
end
local function blob_key() return '{PREFIX}:blob:' .. field('blob_ref') end
-- The last forward pass begun by the process that runs the current attempt (keys.pass_key).
local function pass_key()
  local node, pid = redis.call('HGET', J, 'worker') or '', redis.call('HGET', J, 'worker_pid') or ''
  return '{pass_key("", "")[:-2]}:' .. node .. ':' .. pid
end
local function num(field) return tonumber(redis.call('HGET', J, field) or '0') or 0 end
-- A record written without its model's limit (an older version, a tool) gets the registry's default.
local function max_attempts() local m = num('max_attempts') if m > 0 then return m end return {DEFAULT_MAX_ATTEMPTS} end
-- Per tenant: its jobs (by submission time) and, per model, its waiting jobs; what a tenant may see of the queues.
local function tenant_waiting()
  return '{tenant_waiting_key("", "")[:-1]}' .. field('tenant') .. ':' .. field('model')
end
-- Per model: its waiting jobs, whatever their tenant or however many travel in one message: the queue depth.
local function model_waiting() return '{model_waiting_key("")}' .. field('model') end
-- Per model: its waiting stat (0) and urgent (1) jobs, by class, so a worker can see one is on its way.
local function urgent_waiting() return '{urgent_waiting_key("")}' .. field('model') end
local URGENT_RANKS = {{{Priority.STAT.value} = {Priority.STAT.rank}, {Priority.URGENT.value} = {Priority.URGENT.rank}}}
local function wait_add(score)
  redis.call('ZADD', tenant_waiting(), score, ID)
  redis.call('ZADD', model_waiting(), score, ID)
  local rank = URGENT_RANKS[field('priority')]
  if rank then redis.call('ZADD', urgent_waiting(), rank, ID) end
end
local function wait_remove()
  redis.call('ZREM', tenant_waiting(), ID)
  redis.call('ZREM', model_waiting(), ID)
  redis.call('ZREM', urgent_waiting(), ID)
end
local function tenant_jobs() return '{tenant_jobs_key("")}' .. field('tenant') end
-- Cluster-wide counters for /metrics: one hash per counter, the field is the label values joined by '|'.
local function count(name, labels) redis.call('HINCRBY', '{_STATS_PREFIX}' .. name, labels, 1) end
local function model() return field('model') end
local function error_code(err)
  if err == '' then return '' end
  local ok, decoded = pcall(cjson.decode, err)
  if ok and type(decoded) == 'table' and type(decoded.code) == 'string' then return decoded.code end
  return 'unknown'
end
-- Move the job to a final state: drop it from every index, announce it, keep it readable for keep_ttl.
local function finalize(status, result, err, keep_ttl, keep_blob, callback_grace)
  redis.call('HSET', J, 'status', status, 'finished_at', now, 'result', result, 'error', err)
  redis.call('HDEL', J, 'lease_until')
  wait_remove()
  redis.call('EXPIRE', J, keep_ttl)
  if keep_blob then redis.call('EXPIRE', blob_key(), keep_ttl) else redis.call('DEL', blob_key()) end
  local tensor = redis.call('HGET', J, 'tensor_ref')
  if tensor then redis.call('DEL', '{PREFIX}:blob:' .. tensor) end
  redis.call('ZREM', LEASES, ID)
  redis.call('ZREM', QUEUED, ID)
  redis.call('ZREM', PUBLISHED, ID)
  redis.call('ZREM', RETRIES, ID)
  local owed = field('callback_url') ~= ''
  if owed then
    redis.call('HSET', J, 'callback_state', 'pending', 'callback_attempts', 0)
    redis.call('ZADD', CALLBACKS, now + tonumber(callback_grace), ID)
  end
  redis.call('PUBLISH', '{done_channel()}', ID)
  count('finished', model() .. '|' .. status .. '|' .. error_code(err))
  if status == 'failed' then
    local minute = '{_FAILURES_PREFIX}' .. math.floor(now / 60)
    redis.call('HINCRBY', minute, model(), 1)
    redis.call('EXPIRE', minute, {FAILURES_KEEP_S})
  end
  return owed
end
-- An attempt that died with its worker process. Only a forward pass run alone proves that the job itself ended the
-- process: that death is charged (`lost`, shown as `poison` once the attempts are used up). A job that shared the
-- batch becomes a suspect and runs alone next time; one that was waiting or decoding beside the culprit is a
-- bystander. Both are spared the attempt, at most max_attempts times, so that a crash loop still ends.
local function lose_attempt()
  local computing = redis.call('HEXISTS', J, 'computing_at') == 1
  if computing then  -- its process began another pass since: this job's own had ended, unrecorded
    local last = redis.call('GET', pass_key())
    computing = not last or last == redis.call('HGET', J, 'computing_pass')
  end
  local alone = computing and num('computing_with') <= 1
  if computing and not alone then redis.call('HSET', J, 'suspect', 1) end
  if not alone and num('spared') < max_attempts() then
    redis.call('HINCRBY', J, 'spared', 1)
  else
    redis.call('HINCRBY', J, 'lost', 1)
  end
end
local function out_of_attempts() return num('attempts') - num('handoffs') - num('spared') >= max_attempts() end
-- Put a job back in the queue after a failed attempt; the reconciler publishes it once the backoff ends.
local function requeue(backoff_s, err)
  redis.call('HSET', J, 'status', 'queued', 'retry_at', now + backoff_s, 'last_error', err)
  redis.call('HDEL', J, 'lease_until', 'computing_at', 'computing_with', 'computing_pass')
  redis.call('ZREM', LEASES, ID)
  redis.call('ZADD', RETRIES, now + backoff_s, ID)
  redis.call('ZADD', QUEUED, num('expires_at'), ID)
  wait_add(num('submitted_at'))
end
-- Out of attempts: fail with the last error (or `poison` when the attempts died with their worker), and keep
-- the upload so that an operator can requeue the job from the dead-letter list.
local function dead_letter(last_error, keep_ttl, grace)
  local err = last_error
  if num('lost') > 0 then
    err = cjson.encode({{code = 'poison', retryable = false,
      message = 'its worker process died during the job ' .. num('lost') .. ' time(s); it was dead-lettered'}})
  end
  finalize('failed', '', err, keep_ttl, true, grace)
  redis.call('ZADD', DEAD, now, ID)
end
"""

# KEYS: job, idempotency key (or the job key again), the model's waiting set. ARGV: id, queue deadline offset s, keep
# ttl, the model's max queue depth (0: none), field pairs... Returns the id stored: this one, the live job already
# stored under the idempotency key (a replay is never refused), or QUEUE_FULL when the model's waiting jobs number
# max queue depth or more: checked here, in the same step as the job is added, so that concurrent submissions
# cannot overshoot the limit.
CREATE = f"""{_PRELUDE}
local replay = KEYS[2] ~= J and redis.call('GET', KEYS[2])
if replay and redis.call('EXISTS', '{PREFIX}:job:' .. replay) == 1 then return replay end
local max_depth = tonumber(ARGV[4])
if max_depth > 0 and redis.call('ZCARD', KEYS[3]) >= max_depth then return '{QUEUE_FULL}' end
if KEYS[2] ~= J then redis.call('SET', KEYS[2], ID, 'EX', ARGV[3]) end
local expires_at = now + tonumber(ARGV[2])
redis.call('HSET', J, 'submitted_at', now, 'expires_at', expires_at, 'status', 'queued', 'attempts', 0,
  unpack(ARGV, 5))
redis.call('EXPIRE', J, ARGV[3])
redis.call('ZADD', QUEUED, expires_at, ID)
redis.call('ZADD', PUBLISHED, now, ID)
wait_add(now)
redis.call('ZADD', tenant_jobs(), now, ID)
-- The tenant's job index forgets what the records themselves have forgotten.
redis.call('ZREMRANGEBYSCORE', tenant_jobs(), '-inf', now - tonumber(ARGV[3]))
redis.call('EXPIRE', tenant_jobs(), ARGV[3])
return ID
"""

# ARGV: id, node, pid, lease s, expired error, keep ttl, callback grace.
# Returns {outcome, token, lost, queued s, priority, expires at, tenant, own deadline}: outcome 'claimed', 'leased' (a
# live attempt holds it), a final status, 'missing'; queued s (a string: Lua numbers become integers in replies) is how
# long the job waited since submission. A claim adds the job's priority and queue deadline (which pick its broker
# priority step), its tenant, whose sub-queue a decoding stage hands the job on to (protocol.fairness), and its queue
# deadline again where the client set one ('' where it is only the default keep time): the batcher orders jobs of one
# class by the deadlines clients asked for, and the rest by arrival, which is the broker's fair order between tenants.
CLAIM = f"""{_PRELUDE}
local status = redis.call('HGET', J, 'status')
if not status then return {{'missing', 0, 0}} end
if status == 'queued' then
  if now > num('expires_at') then
    finalize('expired', '', ARGV[5], ARGV[6], false, ARGV[7])
    return {{'expired', 0, 0}}
  end
elseif status == 'running' then
  if num('lease_until') > now then return {{'leased', 0, 0}} end
  lose_attempt()
else
  return {{status, 0, 0}}
end
if out_of_attempts() then
  dead_letter(redis.call('HGET', J, 'last_error') or '', ARGV[6], ARGV[7])
  return {{'failed', 0, 0}}
end
local token = redis.call('HINCRBY', J, 'attempts', 1)
local lease_until = now + tonumber(ARGV[4])
redis.call('HSET', J, 'status', 'running', 'started_at', now, 'lease_until', lease_until,
  'worker', ARGV[2], 'worker_pid', ARGV[3])
redis.call('HDEL', J, 'computing_at', 'computing_with', 'computing_pass', 'retry_at')
redis.call('EXPIRE', J, ARGV[6])
redis.call('ZADD', LEASES, lease_until, ID)
redis.call('ZREM', QUEUED, ID)
redis.call('ZREM', PUBLISHED, ID)
redis.call('ZREM', RETRIES, ID)
wait_remove()
count('claims', model())
if token > 1 then count('redeliveries', model()) end
local order = redis.call('HMGET', J, 'priority', 'expires_at', 'tenant', 'deadline_s')
return {{'claimed', token, num('lost') + num('suspect'), tostring(now - num('submitted_at')),
  order[1] or '', order[2] or '', order[3] or '', (order[4] and order[2]) or ''}}
"""

_FENCE = """
local status = redis.call('HGET', J, 'status')
if not status then return 'missing' end
if status ~= 'running' or redis.call('HGET', J, 'attempts') ~= ARGV[2] then return 'fenced' end
"""

# ARGV: id, token, expired error, keep ttl, callback grace, jobs in the batch, pass id. Marks the attempt as computing:
# from here on it can no longer be cancelled. A job whose queue deadline passed while it waited in the worker's batcher
# expires instead. The pass id becomes its process's last pass (keys.pass_key).
BEGIN = f"""{_PRELUDE}{_FENCE}
if now > num('expires_at') then
  finalize('expired', '', ARGV[3], ARGV[4], false, ARGV[5])
  return 'expired'
end
redis.call('HSET', J, 'computing_at', now, 'computing_with', ARGV[6], 'computing_pass', ARGV[7])
redis.call('SET', pass_key(), ARGV[7], 'EX', ARGV[4])
return 'ok'
"""

# ARGV: id, token, lease s.
RENEW = f"""{_PRELUDE}{_FENCE}
redis.call('HSET', J, 'lease_until', now + tonumber(ARGV[3]))
redis.call('ZADD', LEASES, now + tonumber(ARGV[3]), ID)
return 'ok'
"""

# ARGV: id, token, final status, result json, error json, keep ttl, callback grace, batch size.
# Returns 'ok', or 'ok:callback' when a callback is now owed.
FINISH = f"""{_PRELUDE}{_FENCE}
redis.call('HSET', J, 'batch_size', ARGV[8])
if finalize(ARGV[3], ARGV[4], ARGV[5], ARGV[6], false, ARGV[7]) then return 'ok:callback' end
return 'ok'
"""

# ARGV: id, token, backoff s, error json, keep ttl, callback grace. A transient failure: retry, or dead-letter.
RELEASE = f"""{_PRELUDE}{_FENCE}
if out_of_attempts() then
  dead_letter(ARGV[4], ARGV[5], ARGV[6])
  return 'dead'
end
requeue(tonumber(ARGV[3]), ARGV[4])
return 'ok'
"""

# ARGV: id, backoff s, keep ttl, callback grace. A running job whose lease lapsed: its worker is gone.
RECOVER = f"""{_PRELUDE}
if redis.call('HGET', J, 'status') ~= 'running' then
  redis.call('ZREM', LEASES, ID)
  return 'gone'
end
if num('lease_until') > now then return 'live' end
lose_attempt()
if out_of_attempts() then
  count('recoveries', model() .. '|dead')
  dead_letter('', ARGV[3], ARGV[4])
  return 'dead'
end
local err = cjson.encode({{code = 'worker_lost', message = 'the worker running the job was lost', retryable = true}})
requeue(tonumber(ARGV[2]), err)
count('recoveries', model() .. '|requeued')
return 'requeued'
"""

# ARGV: id, cancelled error json, keep ttl, callback grace. Queued, or claimed but not yet computing.
CANCEL = f"""{_PRELUDE}
local status = redis.call('HGET', J, 'status')
if not status then return 'missing' end
if status == 'queued' or (status == 'running' and not redis.call('HGET', J, 'computing_at')) then
  finalize('cancelled', '', ARGV[2], ARGV[3], false, ARGV[4])
  return 'ok'
end
return status
"""

# ARGV: id, expired error json, keep ttl, callback grace. A queued job past its queue deadline.
EXPIRE = f"""{_PRELUDE}
local status = redis.call('HGET', J, 'status')
if not status then
  redis.call('ZREM', QUEUED, ID)
  redis.call('ZREM', PUBLISHED, ID)
  redis.call('ZREM', RETRIES, ID)
  return 'missing'
end
if status ~= 'queued' or now <= num('expires_at') then return status end
finalize('expired', '', ARGV[2], ARGV[3], false, ARGV[4])
return 'expired'
"""

# ARGV: id, queue ttl s, keep ttl. A dead-lettered job back to the queue with fresh attempts.
REQUEUE_DEAD = f"""{_PRELUDE}
if not redis.call('ZSCORE', DEAD, ID) then return 'not_dead' end
if redis.call('HGET', J, 'status') ~= 'failed' then redis.call('ZREM', DEAD, ID) return 'not_dead' end
if redis.call('EXISTS', blob_key()) == 0 then return 'blob_missing' end
local expires_at = now + tonumber(ARGV[2])
redis.call('HSET', J, 'status', 'queued', 'attempts', 0, 'lost', 0, 'spared', 0, 'suspect', 0, 'expires_at', expires_at,
  'result', '', 'error', '', 'finished_at', '', 'started_at', '')
redis.call('HDEL', J, 'last_error', 'callback_state', 'callback_attempts')
redis.call('EXPIRE', J, ARGV[3])
redis.call('EXPIRE', blob_key(), ARGV[3])
redis.call('ZREM', DEAD, ID)
redis.call('ZREM', CALLBACKS, ID)
redis.call('ZADD', QUEUED, expires_at, ID)
redis.call('ZADD', PUBLISHED, now, ID)
wait_add(now)
return 'ok'
"""

# ARGV: id, in-flight grace s. Take a due callback for delivery: it will not be handed out again for the grace.
CALLBACK_TAKE = f"""{_PRELUDE}
if not redis.call('ZSCORE', CALLBACKS, ID) then return 'none' end
if redis.call('EXISTS', J) == 0 then redis.call('ZREM', CALLBACKS, ID) return 'missing' end
redis.call('ZADD', CALLBACKS, now + tonumber(ARGV[2]), ID)
redis.call('HINCRBY', J, 'callback_attempts', 1)
return 'ok'
"""

# ARGV: id, outcome ('delivered' | 'retry' | 'failed'), detail, next attempt in s.
CALLBACK_DONE = f"""{_PRELUDE}
if redis.call('EXISTS', J) == 0 then redis.call('ZREM', CALLBACKS, ID) return 'missing' end
redis.call('HSET', J, 'callback_last', ARGV[3])
count('callbacks', ARGV[2])
if ARGV[2] == 'retry' then
  redis.call('ZADD', CALLBACKS, now + tonumber(ARGV[4]), ID)
  return 'retry'
end
redis.call('HSET', J, 'callback_state', ARGV[2], 'callback_done_at', now)
redis.call('ZREM', CALLBACKS, ID)
return ARGV[2]
"""

# KEYS: job, idempotency key (or the job key again). ARGV: id. Only a job no worker has touched is removed.
DISCARD = f"""{_PRELUDE}
local status = redis.call('HGET', J, 'status')
if status and status ~= 'queued' then return status end
if KEYS[2] ~= J and redis.call('GET', KEYS[2]) == ID then redis.call('DEL', KEYS[2]) end
redis.call('DEL', blob_key())
wait_remove()
redis.call('ZREM', tenant_jobs(), ID)
redis.call('DEL', J)
redis.call('ZREM', QUEUED, ID)
redis.call('ZREM', PUBLISHED, ID)
return 'discarded'
"""

# ARGV: id, token, tensor ref, image info json. The decoding stage is done: the job waits again, now for the model's
# stage, which reads the tensor. The attempt number keeps growing (fencing stays monotonic); `handoffs` keeps a
# decoded job from counting its decoding against its attempts.
HANDOFF = f"""{_PRELUDE}{_FENCE}
redis.call('HSET', J, 'status', 'queued', 'tensor_ref', ARGV[3], 'image_info', ARGV[4])
redis.call('HINCRBY', J, 'handoffs', 1)
redis.call('HDEL', J, 'lease_until', 'computing_at', 'computing_pass')
redis.call('ZREM', LEASES, ID)
redis.call('ZADD', QUEUED, num('expires_at') + 0, ID)
redis.call('ZADD', PUBLISHED, now, ID)
wait_add(num('submitted_at'))
return 'ok'
"""

# KEYS: a model's set of waiting stat and urgent jobs. ARGV: the model (unused), a class rank. Returns 1 when a job of
# a class more urgent than the rank is there to be claimed now (queued, within its deadline, not backing off before a
# retry), else 0. Ids whose record has gone (its keep time ran out before anything finalised it) are forgotten, so a
# ghost can never hold routine batches back.
URGENT_WAITING = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, 32)
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', '{job_key("")}' .. id, 'status', 'expires_at', 'retry_at')
  if not f[1] then
    redis.call('ZREM', KEYS[1], id)
  elseif f[1] == 'queued' and now <= (tonumber(f[2]) or 0) and now >= (tonumber(f[3] or '0') or 0) then
    return 1
  end
end
return 0
"""

# ARGV[1]: how many of the set's oldest members to look at. A waiting-set entry whose record is gone (its keep time
# ran out before anything finalised it: no reconciler ran that long, or Redis evicted it) would count in the queue
# depth forever: removed here. Ghosts are a set's oldest entries, since their records outlived none of the live ones.
SWEEP_WAITING = f"""
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local removed = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', '{job_key("")}' .. id) == 0 then
    redis.call('ZREM', KEYS[1], id)
    removed = removed + 1
  end
end
return removed
"""


def _many(script: str) -> str:
    """`script` run for many jobs in one call, each as if alone (a pipeline of single calls costs Redis a script
    setup per job: about a third of what a bulk job costs it). KEYS: each job's keys in turn, ARGV[1] of them per
    job; then, per job, how many arguments it has and those arguments. Returns each job's reply, in order. The jobs
    share one clock reading."""
    body = script.removeprefix(_PRELUDE)
    return f"""{_PRELUDE}
local function one(KEYS, ARGV)
  J, ID, fixed = KEYS[1], ARGV[1], {{}}
{body}
end
local per_job, replies, at = tonumber(ARGV[1]), {{}}, 2
for i = 1, #KEYS / per_job do
  local n = tonumber(ARGV[at])
  local reply = one({{unpack(KEYS, (i - 1) * per_job + 1, i * per_job)}}, {{unpack(ARGV, at + 1, at + n)}})
  if reply == nil then reply = false end
  replies[i] = reply
  at = at + n + 1
end
return replies
"""


CREATE_MANY = _many(CREATE)
CLAIM_MANY = _many(CLAIM)
BEGIN_MANY = _many(BEGIN)
RENEW_MANY = _many(RENEW)
FINISH_MANY = _many(FINISH)
