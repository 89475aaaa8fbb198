-- prioqd.lua: every multi-step change prioqd makes to Redis, each one atomic.
--
-- Called as: EVALSHA <sha> 0 <prefix> <command> <args...>
-- No KEYS are declared: names are built from the prefix (as dramatiq's dispatch.lua
-- does), so prioqd runs on a single Redis or a replicated primary, not on a Cluster.
-- Times are Redis's own clock (TIME), so daemons on hosts with skewed clocks agree
-- on leases and due times.
--
-- Key layout (P = prefix, D = daemon id, p = priority name, T = token):
--   P:queue:p     LIST   producers LPUSH job JSON; daemons take from the RIGHT end,
--                        so the right end is the head and "put back" means RPUSH.
--   P:claim:D:p   LIST   payloads D has taken from P:queue:p (by the claim command or
--                        by a blocking BLMOVE) but not yet recorded as started.
--   P:active:D    HASH   T -> "p\n<job json>" for each job D is running; T is unique
--                        within D, the JSON carries the job id.
--   P:daemons     ZSET   D -> lease expiry in ms. Past it, any daemon may recover D.
--   P:daemon:D    HASH   host, pid, priorities ("high,normal,low"), slots, started_at.
--   P:job:<id>    HASH   status, task, priority, attempts, result, error, ...
--   P:done:<id>   LIST   the outcome JSON of a job that has ended (for BLPOP).
--   P:dead        LIST   dead-letter JSON, newest on the left.
--   P:scheduled   ZSET   "p\n<job json>" -> due time in ms (retries, delayed jobs).
--   P:events      pub/sub channel: the outcome JSON of every attempt.
--
-- Invariant: a job is always in exactly one of P:queue:p, P:claim:D:p, P:active:D,
-- P:scheduled or P:dead (or it has ended), and every move between them is one
-- script call. That is what makes a SIGKILL or a dropped connection lose nothing.

local prefix = ARGV[1]
local command = ARGV[2]

local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function queue_key(p) return prefix .. ':queue:' .. p end
local function claim_key(d, p) return prefix .. ':claim:' .. d .. ':' .. p end
local function active_key(d) return prefix .. ':active:' .. d end
local function daemon_key(d) return prefix .. ':daemon:' .. d end
local function job_key(id) return prefix .. ':job:' .. id end
local function done_key(id) return prefix .. ':done:' .. id end
local daemons_key = prefix .. ':daemons'
local dead_key = prefix .. ':dead'
local scheduled_key = prefix .. ':scheduled'
local events_key = prefix .. ':events'

-- "p\n<json>" -> p, json
local function split_entry(v)
    local i = string.find(v, '\n', 1, true)
    return string.sub(v, 1, i - 1), string.sub(v, i + 1)
end

local function split_csv(s)
    local out = {}
    for item in string.gmatch(s, '[^,]+') do out[#out + 1] = item end
    return out
end

local function push_done(id, ttl, outcome)
    if id == '' then return end
    local key = done_key(id)
    redis.call('DEL', key)
    redis.call('RPUSH', key, outcome)
    redis.call('EXPIRE', key, ttl)
end

-- Put daemon d's claim lists back at the head of their queues; returns how many.
local function restore_claims(d, priorities)
    local n = 0
    for _, p in ipairs(priorities) do
        -- The claim list holds the newest on the left: moving from the left onto the
        -- right end of the queue leaves the oldest claimed at the very head.
        while redis.call('LMOVE', claim_key(d, p), queue_key(p), 'LEFT', 'RIGHT') do
            n = n + 1
        end
    end
    return n
end

-- Put every job daemon d holds back at the head of its queue; returns how many.
local function recover(d, fallback_priorities)
    local prios = redis.call('HGET', daemon_key(d), 'priorities')
    local n = restore_claims(d, prios and split_csv(prios) or fallback_priorities)
    local active = redis.call('HVALS', active_key(d))
    for _, v in ipairs(active) do
        local p, json = split_entry(v)
        redis.call('RPUSH', queue_key(p), json)
        n = n + 1
        -- Its hash said "running" for a daemon that is gone. (Decoding only reads the
        -- id: the payload itself is pushed back byte for byte.)
        local ok, job = pcall(cjson.decode, json)
        if ok and type(job) == 'table' and type(job.id) == 'string' then
            local key = job_key(job.id)
            if redis.call('HGET', key, 'status') == 'running' then
                redis.call('HSET', key, 'status', 'queued')
            end
        end
    end
    redis.call('DEL', active_key(d), daemon_key(d))
    redis.call('ZREM', daemons_key, d)
    return n
end

local function next_due_in(now)
    local first = redis.call('ZRANGE', scheduled_key, 0, 0, 'WITHSCORES')
    if #first == 0 then return -1 end
    return math.max(0, tonumber(first[2]) - now)
end

-- Reads "n k1 v1 ... kn vn" starting at ARGV[i]; returns {k1, v1, ...} and the next i.
local function read_pairs(i)
    local n = tonumber(ARGV[i])
    local out = {}
    for j = i + 1, i + 2 * n do out[#out + 1] = ARGV[j] end
    return out, i + 2 * n + 1
end

-- Reads "n a1 ... an" starting at ARGV[i].
local function read_list(i)
    local n = tonumber(ARGV[i])
    local out = {}
    for j = i + 1, i + n do out[#out + 1] = ARGV[j] end
    return out, i + n + 1
end

local function write_job(id, ttl, pairs, dels)
    if id == '' then return end
    local key = job_key(id)
    if dels and #dels > 0 then redis.call('HDEL', key, unpack(dels)) end
    if #pairs > 0 then redis.call('HSET', key, unpack(pairs)) end
    redis.call('EXPIRE', key, ttl)
end

-- cycle D want n p1..pn op args... op args...
-- The daemon's one round trip: apply a batch of state changes in order, then claim
-- up to `want` payloads, highest priority first, into D's claim lists.
-- Returns {{one integer per op}, {p, payload, p, payload, ...}}.
-- Each op is guarded so that applying it twice (a reply lost to a dropped
-- connection, then a retry) changes nothing the second time.
--
--   start  p raw T json id ttl npairs k v...   claim -> active, job hash "running";
--                                             returns attempts, or -1 if the claim is
--                                             gone (recovered by another daemon)
--   end    T id ttl done dead member delay_ms outcome ndel k... npairs k v...
--                                             active -> ended (done list if done=1),
--                                             dead letters (dead ~= ''), or the
--                                             schedule (member ~= ''); 1, or 0 if T
--                                             is not active
--   finish p raw id ttl outcome npairs k v... claim -> succeeded in one step, for a
--                                             job that ended before its start was
--                                             recorded; `outcome` lacks its attempts,
--                                             appended here. Returns attempts, or -1 if
--                                             the claim is gone
--   requeue T id                              active -> head of queue, attempt not
--                                             charged; 1 or 0
--   reject p raw id ttl outcome dead npairs k v...
--                                             claim -> dead letters; 1 or 0
--   schedule p raw id ttl member delay_ms npairs k v...
--                                             claim -> scheduled; 1 or 0
--   putback p raw                             claim -> head of queue; 1 or 0
--   restore p                                 all of claim:D:p -> head of queue;
--                                             returns how many
if command == 'cycle' then
    local d = ARGV[3]
    local want = tonumber(ARGV[4])
    local priorities, i = read_list(5)
    local active = active_key(d)
    local results = {}
    local now = nil
    while i <= #ARGV do
        local op = ARGV[i]
        local r
        if op == 'start' then
            local p, raw, token, json, id, ttl = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
            local pairs
            pairs, i = read_pairs(i + 7)
            if redis.call('HEXISTS', active, token) == 1 then
                r = tonumber(redis.call('HGET', job_key(id), 'attempts') or '1')
            elseif redis.call('LREM', claim_key(d, p), 1, raw) == 0 then
                r = -1
            else
                redis.call('HSET', active, token, p .. '\n' .. json)
                r = redis.call('HINCRBY', job_key(id), 'attempts', 1)
                -- A rerun: what the last attempt left is not this one's.
                local stale = nil
                if r > 1 then stale = {'finished_at', 'duration_s', 'retry_at', 'result'} end
                write_job(id, ttl, pairs, stale)
            end
        elseif op == 'end' then
            local token, id, ttl, done, dead, member, delay_ms, outcome =
                ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
                ARGV[i + 7], ARGV[i + 8]
            local dels, pairs
            dels, i = read_list(i + 9)
            pairs, i = read_pairs(i)
            if redis.call('HDEL', active, token) == 1 then
                write_job(id, ttl, pairs, dels)
                if done == '1' then push_done(id, ttl, outcome) end
                if dead ~= '' then redis.call('LPUSH', dead_key, dead) end
                if member ~= '' then
                    now = now or now_ms()
                    redis.call('ZADD', scheduled_key, now + tonumber(delay_ms), member)
                end
                redis.call('PUBLISH', events_key, outcome)
                r = 1
            else
                r = 0
            end
        elseif op == 'finish' then
            local p, raw, id, ttl, outcome = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
            local pairs
            pairs, i = read_pairs(i + 6)
            if redis.call('LREM', claim_key(d, p), 1, raw) == 0 then
                -- Applied already (a lost reply, now repeated), or the claim was taken.
                local job = redis.call('HMGET', job_key(id), 'status', 'daemon', 'attempts')
                if job[1] == 'succeeded' and job[2] == d then r = tonumber(job[3]) else r = -1 end
            else
                r = redis.call('HINCRBY', job_key(id), 'attempts', 1)
                pairs[#pairs + 1] = 'attempts'
                pairs[#pairs + 1] = r
                write_job(id, ttl, pairs, r > 1 and {'error', 'traceback', 'retry_at'} or nil)
                outcome = outcome .. r .. '}'
                push_done(id, ttl, outcome)
                redis.call('PUBLISH', events_key, outcome)
            end
        elseif op == 'requeue' then
            local token, id = ARGV[i + 1], ARGV[i + 2]
            i = i + 3
            local v = redis.call('HGET', active, token)
            r = 0
            if v then
                redis.call('HDEL', active, token)
                local p, json = split_entry(v)
                redis.call('RPUSH', queue_key(p), json)
                local key = job_key(id)
                if redis.call('EXISTS', key) == 1 then
                    redis.call('HINCRBY', key, 'attempts', -1)
                    redis.call('HSET', key, 'status', 'queued')
                end
                r = 1
            end
        elseif op == 'reject' then
            local p, raw, id, ttl, outcome, dead = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
            local pairs
            pairs, i = read_pairs(i + 7)
            r = 0
            if redis.call('LREM', claim_key(d, p), 1, raw) == 1 then
                redis.call('LPUSH', dead_key, dead)
                if id ~= '' then
                    write_job(id, ttl, pairs, nil)
                    push_done(id, ttl, outcome)
                end
                redis.call('PUBLISH', events_key, outcome)
                r = 1
            end
        elseif op == 'schedule' then
            local p, raw, id, ttl, member, delay_ms = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
            local pairs
            pairs, i = read_pairs(i + 7)
            r = 0
            if redis.call('LREM', claim_key(d, p), 1, raw) == 1 then
                now = now or now_ms()
                redis.call('ZADD', scheduled_key, now + tonumber(delay_ms), member)
                write_job(id, ttl, pairs, nil)
                r = 1
            end
        elseif op == 'putback' then
            local p, raw = ARGV[i + 1], ARGV[i + 2]
            i = i + 3
            r = 0
            if redis.call('LREM', claim_key(d, p), 1, raw) == 1 then
                redis.call('RPUSH', queue_key(p), raw)
                r = 1
            end
        elseif op == 'restore' then
            r = restore_claims(d, {ARGV[i + 1]})
            i = i + 2
        else
            return redis.error_reply('prioqd: unknown cycle op ' .. tostring(op))
        end
        results[#results + 1] = r
    end
    local claimed = {}
    for _, p in ipairs(priorities) do
        if want <= 0 then break end
        while want > 0 do
            local v = redis.call('LMOVE', queue_key(p), claim_key(d, p), 'RIGHT', 'LEFT')
            if not v then break end
            claimed[#claimed + 1] = p
            claimed[#claimed + 1] = v
            want = want - 1
        end
    end
    return {results, claimed}
end

-- heartbeat D lease_ms max_recover field value field value ...
-- Extends D's lease (registering it, with the given info fields, if it has none),
-- then recovers up to max_recover daemons whose lease has run out.
-- Returns {registered (1 if D was not registered), recovered daemon ids joined
-- by ',', jobs put back, ms until the next scheduled job or -1}.
if command == 'heartbeat' then
    local d = ARGV[3]
    local lease_ms = tonumber(ARGV[4])
    local max_recover = tonumber(ARGV[5])
    local now = now_ms()
    local registered = redis.call('ZADD', daemons_key, now + lease_ms, d)
    if registered == 1 and #ARGV >= 6 then
        redis.call('HSET', daemon_key(d), unpack(ARGV, 6))
    end
    local expired = redis.call('ZRANGEBYSCORE', daemons_key, '-inf', now, 'LIMIT', 0, max_recover)
    local jobs = 0
    if #expired > 0 then
        -- Idle daemons heartbeat forever: only pay for this when someone died.
        local fallback = {}
        local mine = redis.call('HGET', daemon_key(d), 'priorities')
        if mine then fallback = split_csv(mine) end
        for _, other in ipairs(expired) do
            jobs = jobs + recover(other, fallback)
        end
    end
    return {registered, table.concat(expired, ','), jobs, next_due_in(now)}
end

-- recover D p1 p2 ...
-- Puts everything D holds back at the head of its queues and forgets D. Used by a
-- daemon on a clean stop (for itself) and on start-up for a dead predecessor on
-- the same host. The priorities are a fallback for a D with no info hash.
if command == 'recover' then
    return recover(ARGV[3], {unpack(ARGV, 4)})
end

-- undead entry p payload id
-- Moves one dead letter (matched by its exact text) back to the tail of queue p as
-- a fresh job: its attempts start again from 0. Returns 1, or 0 if it is gone.
if command == 'undead' then
    if redis.call('LREM', dead_key, 1, ARGV[3]) == 0 then return 0 end
    redis.call('LPUSH', queue_key(ARGV[4]), ARGV[5])
    local id = ARGV[6]
    if id ~= '' and redis.call('EXISTS', job_key(id)) == 1 then
        redis.call('HSET', job_key(id), 'status', 'queued', 'attempts', 0)
        redis.call('DEL', done_key(id))
    end
    return 1
end

-- promote max
-- Moves up to max due jobs from the schedule to the tail of their queues, in due
-- order. Returns {moved, ms until the next scheduled job or -1}.
if command == 'promote' then
    local now = now_ms()
    local due = redis.call('ZRANGEBYSCORE', scheduled_key, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
    for _, member in ipairs(due) do
        local p, json = split_entry(member)
        redis.call('LPUSH', queue_key(p), json)
    end
    if #due > 0 then redis.call('ZREM', scheduled_key, unpack(due)) end
    return {#due, next_due_in(now)}
end

return redis.error_reply('prioqd: unknown command ' .. tostring(command))
