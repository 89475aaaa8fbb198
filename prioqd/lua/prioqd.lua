#!lua
-- prioqd.lua: every multi-step change prioqd makes to Redis, each one atomic.
--
-- Called as: EVALSHA <sha> 0 <prefix> <command> <args...>
-- No KEYS are declared: names are built from the prefix (as dramatiq's dispatch.lua
-- does), so prioqd runs on a single Redis or a replicated primary, not on a Cluster.
-- Times are Redis's own clock (TIME), so daemons on hosts with skewed clocks agree
-- on leases and due times.
--
-- The "#!lua" line above makes Redis (7.0+) refuse the whole script up front when
-- it is out of memory (maxmemory with noeviction), instead of failing at the first
-- write and leaving the writes before it applied: a call applies whole or not at all.
-- Within a call, every op checks the type of each key it will write before its
-- first write (see `unwritable`), for the same reason: Lua writes are not rolled
-- back when a later command fails. (`finish`, which runs for every short job, lets a
-- read and its first write be those checks: the read of the job's attempts, and the
-- push of its outcome, each with pcall.)
--
-- Key layout (P = prefix, D = daemon id, p = priority name, C = claim number):
--   P:queue:p        LIST   producers LPUSH job JSON; daemons take from the RIGHT end,
--                           so the right end is the head and "put back" means RPUSH.
--   P:landing:D:p    LIST   where D's blocking BLMOVE on P:queue:p puts a payload; D's
--                           next cycle adopts it into P:inflight:D (`adopt`).
--   P:adopted:D      HASH   p -> the highest claim number D adopted from P:landing:D:p.
--                           D numbers the payloads landing on one priority in the
--                           order they land and adopts them in that order, so an
--                           `adopt` of a claim at or below it was applied before (a
--                           lost reply, then the retry) and must not take another
--                           payload of the same text. Expires a day after its last
--                           write (only D's retries, seconds apart, read it).
--   P:retired:D      HASH   C -> "<op> <result> <attempt>" for each claim of D that an op
--                           took out of P:inflight:D (ended it, scheduled it, put it
--                           back): the op's name and result, and the attempt number
--                           its entry had (0: never started). A repeat of an op whose
--                           reply D lost answers from here (`gone`), whatever happened
--                           to the job's id since (the same id claimed again, say).
--                           D says in each cycle whether it saw the last reply: if so
--                           these are forgotten first (nothing can be repeated), if
--                           not kept. Expires a day after its last write.
--   P:inflight:D     HASH   C -> "p\nS\nR\n<payload>" for every job D holds. C is D's
--                           claim counter (decimal), unique within D and increasing in
--                           claim order, so sorting by C restores FIFO order. S is "c"
--                           (or "c<A>": A attempts used before, see P:history) while
--                           the start is not recorded, else the attempt number.
--                           R counts how often a daemon died while holding this
--                           payload. <payload> is the producer's bytes until the start
--                           is recorded, then the job JSON with its id pinned.
--   P:daemons        ZSET   D -> lease expiry in ms. Past it, any daemon whose own lease
--                           is unbroken may recover D.
--   P:daemon:D       HASH   host, pid, boot_id, pidns, priorities ("high,normal,low"),
--                           slots, started_at, version; last_error (written by the
--                           daemon's heartbeat when it changes, for `status`).
--   P:job:<id>       HASH   status, task, priority, attempts, claim ("D/C" of the run
--                           that wrote it), daemon, result, error, traceback, started_at,
--                           finished_at, duration_s, retry_at, worker_pid (the worker
--                           its batch went to), progress (JSON the task reported).
--                           Expires result_ttl_s after its last write.
--   P:done:<id>      LIST   the outcome JSON of a job that has ended (for BLPOP).
--   P:dead           LIST   dead-letter JSON, newest on the left.
--   P:payload:<sha1> STRING a payload too large to copy into its dead letter, which
--                           names this key in "payload_key" instead.
--   P:scheduled      ZSET   "p\nU\n<job json>" -> due time in ms (retries, delayed jobs);
--                           U ("D/C") keeps two equal payloads from collapsing into one.
--   P:history        HASH   sha1(payload) -> "R:A" for a payload back in its queue that
--                           has a past: R as above, A the attempts it has used (a retry,
--                           or a started job put back). The claim that takes it moves R
--                           into its inflight entry and returns A, so the daemon knows
--                           the attempt number before the start is written. Expires 30
--                           days after its last write.
--   P:paused         SET    priorities no daemon claims from (`prioqd pause`).
--   P:cancels        ZSET   job id -> expiry ms: cancels asked for jobs held by a daemon;
--                           the daemon that ends such a job as cancelled removes it.
--   P:unique:<id>    STRING the lock of a unique job: "q" while it is queued or scheduled
--                           (set by the push, `enqueue`), "D/C" while claim C of daemon D
--                           runs it, deleted when the job ends, whichever way (`unlock`).
--                           A "D/C" whose claim is gone holds nothing. Expiry: result_ttl_s
--                           plus the job's delay from the push; from the claim that takes
--                           it, at least the job's timeout plus the lease (ops.lock), so
--                           that it outlasts the run; a safety net for a lock nobody
--                           releases (its job deleted by hand, say).
--   P:periodic       HASH   schedule name -> the last tick (ms) handled for it (enqueued, or
--                           recorded without a push: see `periodic`); "<name>:enqueued"
--                           -> the last tick (ms) actually pushed. (Names have no ':'.)
--   P:throughput:M   HASH   status (succeeded, failed, dead, cancelled) -> outcomes
--                           published on P:events in minute M (Unix minutes, Redis
--                           clock), for the dashboard. Each call adds its outcomes at
--                           its end (one HINCRBY a status, not one a job); the key
--                           expires an hour after its last new field.
--   P:events         pub/sub channel: the outcome JSON of every attempt (and of every
--                           cancel: `cancel_queued`, `cancel_scheduled`), and
--                           {"id", "status": "duplicate"} for a unique job pushed twice.
--   P:control        pub/sub channel: operators' commands to the daemons (pause,
--                           resume, cancel), as JSON: {"op": "pause", "priorities": [..]},
--                           {"op": "resume", "priorities": [..]}, {"op": "cancel", "ids": [..]};
--                           and {"op": "uncancel", "ids": [id]} when a cancel is settled
--                           or withdrawn (`withdraw_cancel`): every daemon reads
--                           P:cancels afresh, so none keeps a stale cancel in memory
--                           and cancels a later job of the same id.
--
-- Invariant: a job is always in exactly one of P:queue:p, P:landing:D:p,
-- P:inflight:D, P:scheduled or P:dead (or it has ended), and every move between them
-- is one script call. That is what makes a SIGKILL or a dropped connection lose
-- nothing. Every op is guarded by its claim number, unique to the claim, so applying
-- it again (a reply lost to a dropped connection, then a retry) changes nothing.

local prefix = ARGV[1]
local command = ARGV[2]

local function queue_key(p) return prefix .. ':queue:' .. p end
local function landing_key(d, p) return prefix .. ':landing:' .. d .. ':' .. p end
local function inflight_key(d) return prefix .. ':inflight:' .. d end
local function retired_key(d) return prefix .. ':retired:' .. d end
local function adopted_key(d) return prefix .. ':adopted:' .. d end
local function daemon_key(d) return prefix .. ':daemon:' .. d end
local function job_key(id) return prefix .. ':job:' .. id end
local function done_key(id) return prefix .. ':done:' .. id end
local function payload_key(sha) return prefix .. ':payload:' .. sha end
local daemons_key = prefix .. ':daemons'
local dead_key = prefix .. ':dead'
local scheduled_key = prefix .. ':scheduled'
local history_key = prefix .. ':history'
local paused_key = prefix .. ':paused'
local cancels_key = prefix .. ':cancels'
local events_key = prefix .. ':events'
local control_key = prefix .. ':control'
local function unique_key(id) return prefix .. ':unique:' .. id end
local function throughput_key(minute) return prefix .. ':throughput:' .. minute end
local THROUGHPUT_TTL_S = 3600

-- Outcomes this call published, by status; written by count_outcomes at its end.
local outcomes = {}
local function count(status) outcomes[status] = (outcomes[status] or 0) + 1 end

-- Dead letters kept at most (0: no bound); set by each command that may add one.
local max_dead = 0
-- Dead letters dropped (oldest first) to keep within max_dead by this call.
local trimmed = 0
-- Keys of the wrong type this call read as empty or left as they were, for the
-- daemon to report: a key nobody can read must not stop every daemon that reads it.
local problems = {}
local function skipped(why) problems[#problems + 1] = why end

-- Adds a dead letter, dropping the oldest ones past max_dead (with the payload keys
-- they name).
local function push_dead(letter)
    redis.call('LPUSH', dead_key, letter)
    while max_dead > 0 and redis.call('LLEN', dead_key) > max_dead do
        local old = redis.call('RPOP', dead_key)
        local ok, obj = pcall(cjson.decode, old)
        if ok and type(obj) == 'table' and type(obj.payload_key) == 'string' then
            redis.call('DEL', obj.payload_key)
        end
        trimmed = trimmed + 1
    end
end

local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Adds this call's outcomes to the current minute's P:throughput:M.
local function count_outcomes()
    if next(outcomes) == nil then return end
    local key = throughput_key(math.floor(now_ms() / 60000))
    local new = false
    for status, n in pairs(outcomes) do
        -- (A key of another type must not fail the call after its writes: the
        -- counts are only for show.)
        new = redis.pcall('HINCRBY', key, status, n) == n or new
    end
    -- Only when a field was created (a few times a minute), not every call.
    if new then redis.call('EXPIRE', key, THROUGHPUT_TTL_S) end
end

local function split_csv(s)
    local out = {}
    for item in string.gmatch(s, '[^,]+') do out[#out + 1] = item end
    return out
end

-- An inflight entry "p\nS\nR\n<payload>" -> p, S, R, payload (nil if it is not one:
-- only prioqd writes these, but recovery must not fail on a hand-made one).
local function parse_entry(v)
    local a = string.find(v, '\n', 1, true)
    local b = a and string.find(v, '\n', a + 1, true)
    local c = b and string.find(v, '\n', b + 1, true)
    if not c or not tonumber(string.sub(v, b + 1, c - 1)) then return nil end
    return string.sub(v, 1, a - 1), string.sub(v, a + 1, b - 1),
        tonumber(string.sub(v, b + 1, c - 1)), string.sub(v, c + 1)
end

-- Just the state of an inflight entry (nil if it is not one), without copying its
-- payload out as parse_entry does.
local function entry_state(v)
    local a = string.find(v, '\n', 1, true)
    local b = a and string.find(v, '\n', a + 1, true)
    if not b or not string.find(v, '\n', b + 1, true) then return nil end
    return string.sub(v, a + 1, b - 1)
end

local function make_entry(p, state, recoveries, payload)
    return p .. '\n' .. state .. '\n' .. recoveries .. '\n' .. payload
end

-- An entry's state is "c<A>" while claimed (A: attempts the job had used before, from
-- P:history; "c" alone means none) and the attempt number once started.
local function is_claimed(state) return string.sub(state, 1, 1) == 'c' end

-- Attempts a job has used, as far as its entry knows.
local function used(state)
    if is_claimed(state) then return tonumber(string.sub(state, 2)) or 0 end
    return tonumber(state)
end

-- "p\nU\n<json>" -> p, json
local function parse_member(m)
    local a = string.find(m, '\n', 1, true)
    local b = string.find(m, '\n', a + 1, true)
    return string.sub(m, 1, a - 1), string.sub(m, b + 1)
end

-- The reason `key` cannot be written as type `want`, or nil if it can.
local function unwritable(key, want)
    local t = redis.call('TYPE', key)['ok']
    if t == 'none' or t == want then return nil end
    return 'WRONGTYPE: ' .. key .. ' holds a ' .. t .. ', not a ' .. want
end

-- Why a redis.pcall on `key` (of type `want`) failed, or nil if `reply` is no error:
-- for an op that lets a command be its type check instead of a TYPE first.
local function failed(reply, key, want)
    if type(reply) ~= 'table' or not reply.err then return nil end
    return unwritable(key, want) or tostring(reply.err)
end

-- The first reason any of the {key, type} pairs cannot be written, or nil.
local function check(targets)
    for _, kt in ipairs(targets) do
        local why = unwritable(kt[1], kt[2])
        if why then return why end
    end
    return nil
end

local function write_job(id, ttl, fields, dels)
    if id == '' then return end
    local key = job_key(id)
    if dels and #dels > 0 then redis.call('HDEL', key, unpack(dels)) end
    if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
    redis.call('EXPIRE', key, ttl)
end

-- The done list of `id` becomes {outcome}. Returns the reason if it holds another
-- type, having written nothing: the push is its first write, so a caller may make it
-- its own first write instead of checking the type first.
local function push_done(id, ttl, outcome)
    if id == '' then return nil end
    local key = done_key(id)
    local n = redis.pcall('LPUSH', key, outcome)
    local why = failed(n, key, 'list')
    if why then return why end
    if n > 1 then redis.call('LTRIM', key, 0, 0) end  -- a past run's outcome
    redis.call('EXPIRE', key, ttl)
    return nil
end

-- A dead letter made here, for a payload that never reached a daemon's parser (too
-- large) or that killed its daemons. The payload stays in Redis under its own key,
-- so that the letter is small and `prioqd dead requeue` can put it back.
-- Whether dead letters can be written (P:dead is a list, or absent). Every caller of
-- dead_by_reference checks this first: with P:dead of another type, a payload is left
-- where it is rather than lost between its payload key and a letter that fails.
local function dead_writable() return unwritable(dead_key, 'list') == nil end

-- A job that could not run records so in its hash and done list, if it has an id and
-- they can be written, so that a producer waiting on it hears of it.
local function mark_dead(id, p, reason)
    if not id or check({{job_key(id), 'hash'}, {done_key(id), 'list'}}) then return end
    local ttl = redis.call('TTL', job_key(id))
    if ttl <= 0 then ttl = 86400 end
    redis.call('HSET', job_key(id), 'status', 'dead', 'error', reason)
    push_done(id, ttl, cjson.encode(
        {id = id, priority = p, status = 'dead', result = cjson.null, error = reason}))
end

-- Unique jobs' locks (P:unique:<id>) follow their job on every path it takes: "q"
-- while it waits (in a queue or the schedule), "D/C" while claim C of daemon D holds
-- it to run, gone once it has ended (done, dead-lettered, rejected, cancelled).
-- A lock an ended job left behind would turn every later push of its id into a
-- "duplicate" until the lock expired.

-- A payload on its way to the dead letters (oversized, or poison) longer than this is
-- not decoded to free its unique lock or tell its waiter: a decode blocks Redis (tens
-- of milliseconds a megabyte). The lock's expiry then frees the id.
local DECODE_MAX = 4 * 1024 * 1024

-- The id of a unique job's payload, or nil. (A payload that does not mention
-- "unique" at all is not decoded: most are not unique.)
local function unique_id(payload)
    if not string.find(payload, '"unique"', 1, true) then return nil end
    local ok, job = pcall(cjson.decode, payload)
    if ok and type(job) == 'table' and job.unique == true and type(job.id) == 'string' then
        return job.id
    end
    return nil
end

-- Whether the lock value `cur` still stands for a job: "q" (it waits), or a claim
-- still in its daemon's inflight hash. A claim that is gone (its daemon died and
-- was recovered, or an ending never reached the lock) holds nothing.
local function lock_live(cur)
    if cur == 'q' then return true end
    local d2, c2 = string.match(cur, '^(.*)/(%d+)$')
    return d2 ~= nil and redis.call('HEXISTS', inflight_key(d2), c2) == 1
end

-- The lock of job `id`, if it names the claim whose inflight entry is `v` (a
-- daemon's claim being recovered, whose number the caller does not know), else nil.
local function entry_holder(id, v)
    if not id then return nil end
    local cur = redis.pcall('GET', unique_key(id))
    if type(cur) ~= 'string' then return nil end
    local d2, c2 = string.match(cur, '^(.*)/(%d+)$')
    if d2 and redis.call('HGET', inflight_key(d2), c2) == v then return cur end
    return nil
end

-- Unique job `id` (nil: not a unique job) is no longer held by `holder` ("D/C"; nil
-- for a claim that never took the lock): its lock goes, or with `waits` (the job is
-- back in a queue or the schedule) says "q" again, for `ttl` seconds if given, else
-- for what is left of its expiry. A lock another run holds is left alone; so is a
-- key of another type (nothing is written to it).
local function unlock(id, holder, waits, ttl)
    if not id then return end
    local key = unique_key(id)
    local cur = redis.pcall('GET', key)
    if type(cur) ~= 'string' or (cur ~= 'q' and cur ~= holder) then return end
    if not waits then
        redis.call('DEL', key)
    elseif ttl then
        redis.call('SET', key, 'q', 'EX', ttl)
    elseif cur ~= 'q' then
        redis.call('SET', key, 'q', 'KEEPTTL')
    end
end

local function dead_by_reference(p, payload, reason, fields)
    local sha = redis.sha1hex(payload)
    redis.call('SET', payload_key(sha), payload)
    local letter = {reason = reason, priority = p, payload_key = payload_key(sha),
        bytes = string.len(payload), dead_at = now_ms() / 1000}
    for k, v in pairs(fields or {}) do letter[k] = v end
    push_dead(cjson.encode(letter))
end

-- Notes a payload's past before it goes back to a queue or to the schedule.
local function remember(payload, recoveries, attempts)
    if (recoveries > 0 or attempts > 0) and unwritable(history_key, 'hash') == nil then
        redis.call('HSET', history_key, redis.sha1hex(payload), recoveries .. ':' .. attempts)
        redis.call('EXPIRE', history_key, 30 * 86400)
    end
end

-- The id of a payload, if it is one the daemon accepts and plain enough to be sure
-- of here: 1 to 200 printable ASCII characters, no space (jobs.valid_id also takes
-- other Unicode; Lua cannot tell which of it is printable). Else nil.
local function payload_id(payload)
    if string.len(payload) > DECODE_MAX then return nil end
    local ok, job = pcall(cjson.decode, payload)
    if not ok or type(job) ~= 'table' or type(job.id) ~= 'string' then return nil end
    local id = job.id
    if string.len(id) == 0 or string.len(id) > 200 or string.find(id, '[^\33-\126]') then
        return nil
    end
    return id
end

-- Puts one inflight entry back at the head of its queue, or (a poison payload that
-- has now been held by max_recoveries + 1 daemons that died) into the dead letters.
-- `died`: whether its daemon died (counted) or let it go (a stop, a lost claim).
local function put_back(v, died, max_recoveries)
    local p, state, recoveries, payload = parse_entry(v)
    local id = nil
    if not is_claimed(state) then
        -- Started: its JSON carries the id whose hash says "running".
        local ok, job = pcall(cjson.decode, payload)
        if ok and type(job) == 'table' and type(job.id) == 'string' then id = job.id end
    end
    if died then recoveries = recoveries + 1 end
    if died and recoveries > max_recoveries and dead_writable() then
        local reason = 'poison: its daemon died ' .. recoveries .. ' times while holding it'
        -- Not started (or never adopted: it killed its daemon at once), its id is in
        -- the producer's payload: its waiter hears of it all the same, unless that id's
        -- record is another job's (the same id pushed again, running elsewhere).
        if not id then
            id = payload_id(payload)
            if id and unwritable(job_key(id), 'hash') == nil then
                local status = redis.call('HGET', job_key(id), 'status')
                if status and status ~= 'queued' then id = nil end
            end
        end
        local uid = unique_id(payload)
        unlock(uid, entry_holder(uid, v), false)
        dead_by_reference(p, payload, reason, {id = id or cjson.null})
        mark_dead(id, p, reason)
        return 'dead'
    end
    local uid = unique_id(payload)
    unlock(uid, entry_holder(uid, v), true)
    redis.call('RPUSH', queue_key(p), payload)
    remember(payload, recoveries, used(state))
    if id and unwritable(job_key(id), 'hash') == nil then
        if redis.call('HGET', job_key(id), 'status') == 'running' then
            redis.call('HSET', job_key(id), 'status', 'queued')
        end
    end
    return 'queued'
end

-- A landed payload's past, as P:history has it: recoveries, attempts used.
local function past(payload)
    if redis.call('TYPE', history_key)['ok'] ~= 'hash' then return 0, 0 end
    local v = redis.call('HGET', history_key, redis.sha1hex(payload))
    local r, a = string.match(v or '', '^(%d+):(%d+)$')
    return tonumber(r) or 0, tonumber(a) or 0
end

-- Moves everything in D's landing list for p back to the head of P:queue:p, newest
-- first, so the oldest ends at the very head. With `died` (D died holding them: the
-- blocking wait had handed them over, and a landed job runs before its adopt) each
-- counts that death as an inflight entry does (`put_back`), so a payload that kills
-- its daemon at once still ends in the dead letters. With P:queue:p of another type
-- they go to the dead letters with the reason. Returns {put back, dead-lettered}.
local function restore_landing(d, p, died, max_recoveries)
    local landing = landing_key(d, p)
    local why = unwritable(landing, 'list')
    if why then
        skipped(why)
        return 0, 0
    end
    local queue = queue_key(p)
    local bad_queue = unwritable(queue, 'list')
    if bad_queue and not dead_writable() then
        if redis.call('LLEN', landing) > 0 then skipped(bad_queue) end
        return 0, 0
    end
    local n, dead = 0, 0
    while true do
        local payload = redis.call('LPOP', landing)
        if not payload then break end
        if bad_queue then
            dead_by_reference(p, payload, 'redis error: ' .. bad_queue)
            dead = dead + 1
        elseif died then
            local r, a = past(payload)
            if put_back(make_entry(p, 'c' .. a, r, payload), true, max_recoveries) == 'dead' then
                dead = dead + 1
            else
                n = n + 1
            end
        else
            redis.call('RPUSH', queue, payload)
            n = n + 1
        end
    end
    return n, dead
end

-- A claimed payload's past, taken out of P:history: recoveries, attempts used.
local function recall(payload)
    if redis.call('TYPE', history_key)['ok'] ~= 'hash' then return 0, 0 end
    local sha = redis.sha1hex(payload)
    local past = redis.call('HGET', history_key, sha)
    if not past then return 0, 0 end
    redis.call('HDEL', history_key, sha)
    local r, a = string.match(past, '^(%d+):(%d+)$')
    return tonumber(r) or 0, tonumber(a) or 0
end

-- Inflight claim numbers of D, highest (newest) first.
local function claims_newest_first(inflight)
    local all = redis.call('HKEYS', inflight)
    local cs = {}
    for _, c in ipairs(all) do cs[#cs + 1] = tonumber(c) end
    table.sort(cs, function(a, b) return a > b end)
    return cs
end

-- Puts every job daemon d holds back at the head of its queue, in claim order, and
-- forgets d. Returns {jobs put back, jobs dead-lettered as poison}. A key of d's of
-- the wrong type (its info hash, a landing list, its inflight hash) is left as it is
-- and reported (`problems`): one broken daemon must not keep the others' jobs, which
-- the same heartbeat recovers, from coming back.
local function recover(d, fallback_priorities, died, max_recoveries)
    local info = daemon_key(d)
    local bad_info = unwritable(info, 'hash')
    local prios = nil
    if bad_info then skipped(bad_info) else prios = redis.call('HGET', info, 'priorities') end
    prios = prios and split_csv(prios) or fallback_priorities
    local queued, dead = 0, 0
    for _, p in ipairs(prios) do
        local q, x = restore_landing(d, p, died, max_recoveries)
        queued, dead = queued + q, dead + x
    end
    local inflight = inflight_key(d)
    local bad_inflight = unwritable(inflight, 'hash')
    if bad_inflight then skipped(bad_inflight) end
    -- Newest first onto the head, so the oldest claimed ends at the very head.
    for _, c in ipairs(bad_inflight and {} or claims_newest_first(inflight)) do
        local v = redis.call('HGET', inflight, tostring(c))
        local p, _, _, payload = parse_entry(v)
        local why = p and unwritable(queue_key(p), 'list')
        if not p then
            skipped('entry ' .. c .. ' of ' .. inflight .. ' is not an inflight entry')
        elseif why == nil then
            if put_back(v, died, max_recoveries) == 'dead' then dead = dead + 1 else queued = queued + 1 end
            redis.call('HDEL', inflight, tostring(c))
        elseif dead_writable() then
            dead_by_reference(p, payload, 'redis error: ' .. why)
            dead = dead + 1
            redis.call('HDEL', inflight, tostring(c))
        else
            skipped(why)  -- neither its queue nor the dead letters writable: it stays
        end
    end
    if not bad_info then redis.call('DEL', info) end
    redis.call('ZREM', daemons_key, d)
    -- (A daemon recovered by others may be alive, and retry an op: its marks and
    -- retired claims expire by themselves. One that stopped retries nothing.)
    if not died then redis.call('DEL', adopted_key(d), retired_key(d)) end
    return {queued, dead}
end

local function next_due_in(now)
    -- (A key of another type there must not fail every heartbeat: nothing is due. A
    -- pcall, not a TYPE first: an idle daemon's heartbeat is counted in commands.)
    local first = redis.pcall('ZRANGE', scheduled_key, 0, 0, 'WITHSCORES')
    if type(first) ~= 'table' or first.err or #first == 0 then return -1 end
    return math.max(0, tonumber(first[2]) - now)
end

-- Reads "n a1 ... an" starting at ARGV[i]; returns {a1, ..., an} and the next i.
local function read_list(i)
    local n = tonumber(ARGV[i])
    local out = {}
    for j = i + 1, i + n do out[#out + 1] = ARGV[j] end
    return out, i + n + 1
end

-- ---------------------------------------------------------------------------------
-- cycle: the daemon's one round trip.
--
--   cycle D next_claim max_payload_bytes max_dead tokens keep n p1 size1 .. pn sizen op args...
--
-- keep is "0" when D saw the reply of its last call (P:retired:D is forgotten first:
-- no op of D can be a repeat now), "1" when it did not (the ops it sends again find
-- their results there). Applies a batch of ops in order, then (if D's lease is held) claims payloads into
-- P:inflight:D, highest priority first: from priority p up to `size` payloads per
-- slot token left. Claim numbers are next_claim, next_claim + 1, ... in the order
-- returned. A payload over max_payload_bytes never leaves Redis: it goes to the dead
-- letters by reference and only its reason is returned. Paused priorities
-- (P:paused) are skipped. Dead letters are kept to max_dead (0: no bound).
--
-- Returns {{one integer per op}, {p, payload, attempts used before, p, ...}, lease_held,
--          {reasons of payloads dead-lettered by the claim}, dead letters trimmed,
--          {paused priorities}, {keys of the wrong type read as empty}}.
-- With P:inflight:D of the wrong type the whole call is refused, before any write,
-- with "prioqd: daemon state unusable: <reason>".
--
-- Op results: >= 0 the op applied (or had applied before: the same result again, see
-- P:retired:D); -1 the claim is gone (recovered by another daemon, or settled by
-- another op: nothing was written); -2 the op could not apply
-- (a key of the wrong type) and its job went to the dead letters with the reason;
-- -3 not even that (the dead-letter key has the wrong type): the job stays held.
-- Each op reads its arguments from ARGV[i] and returns (result, next i). Python
-- builds the same layouts in prioqd/ops.py, one class per op.
-- ---------------------------------------------------------------------------------

local D, inflight, retired
local retired_expiry_set = false

-- The inflight entry of claim c, or nil.
local function entry(c) return redis.call('HGET', inflight, c) end

-- Claim c (its entry's state `state`) leaves P:inflight:D, settled by `op` with
-- `result`: remembered in P:retired:D for a repeat of that op (see `gone`). Written
-- at once, op by op (not once at the end of the call): a call that fails half-way
-- keeps what it applied, and a repeat of those ops must find their results.
local function retire(c, state, op, result)
    local attempt = '0'
    if not is_claimed(state) and string.match(state, '^%d+$') then attempt = state end
    redis.call('HSET', retired, c, op .. ' ' .. result .. ' ' .. attempt)
    redis.call('HDEL', inflight, c)
    if not retired_expiry_set then
        redis.call('EXPIRE', retired, 86400)
        retired_expiry_set = true
    end
end

-- The result of `op` on claim c, which D no longer holds: what the op returned when it
-- settled c (this is a repeat: its reply was lost); for 'start', the attempt c ran as
-- (it was started, then settled); -1 otherwise (recovered, or settled by another op).
local function gone(c, op)
    local t = redis.call('HGET', retired, c)
    if not t then return -1 end
    local by, result, attempt = string.match(t, '^(%S+) (%S+) (%S+)$')
    if by == op then return tonumber(result) end
    if op == 'start' and tonumber(attempt) >= 1 then return tonumber(attempt) end
    return -1
end

-- The op on claim c cannot write `why`: move its job to the dead letters instead.
local function fail_op(c, v, why, op)
    if not dead_writable() then return -3 end
    local p, state, _, payload = parse_entry(v)
    retire(c, state, op, -2)
    dead_by_reference(p, payload, 'redis error: ' .. why)
    unlock(unique_id(payload), D .. '/' .. c, false)
    return -2
end

local ops = {}

-- A cancel that no longer applies (its job ended, or the id was pushed anew) leaves
-- P:cancels, and the daemons are told to read it again (they keep it in memory).
local function withdraw_cancel(id)
    if redis.call('ZREM', cancels_key, id) == 1 then
        redis.call('PUBLISH', control_key, cjson.encode({op = 'uncancel', ids = {id}}))
    end
end

-- Claim C's job ended (or went to the schedule to run at due_ms, if given): what it
-- held as a unique job, and a cancel asked for it, go. `flags` holds "u" for a unique
-- job, "c" for one that ended cancelled (so jobs that are neither pay nothing here).
-- The lock may still say "q": a job cancelled before it took it.
local function settled(id, c, flags, ttl, due_ms)
    if flags == '' then return end
    if string.find(flags, 'u', 1, true) then
        local lock_ttl = nil
        if due_ms then
            -- Until it is due, and result_ttl_s after that, as a push would give it.
            lock_ttl = tonumber(ttl) + math.max(0, math.ceil((due_ms - now_ms()) / 1000))
        end
        unlock(id, D .. '/' .. c, due_ms ~= nil, lock_ttl)
    end
    if string.find(flags, 'c', 1, true) then withdraw_cancel(id) end
end

-- The keys `settled` writes for these flags, added to `targets`.
local function settle_targets(id, flags, targets)
    if string.find(flags, 'u', 1, true) then targets[#targets + 1] = {unique_key(id), 'string'} end
    if string.find(flags, 'c', 1, true) then targets[#targets + 1] = {cancels_key, 'zset'} end
    return targets
end

-- lock C id ttl: claim C is a unique job: it takes the job's lock for ttl seconds
-- (the daemon makes that outlast the run: its timeout plus the lease, at least),
-- unless a live run of the same id holds it, in which case this claim is a
-- duplicate: it is dropped (not run, not dead-lettered) and "duplicate" is
-- published. 1 locked, 0 dropped as a duplicate, -1 the claim is gone.
ops.lock = function(i)
    local c, id, ttl = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local v = entry(c)
    if not v then return gone(c, 'lock'), i + 4 end
    local key, me = unique_key(id), D .. '/' .. c
    local why = unwritable(key, 'string')
    if why then return fail_op(c, v, why, 'lock'), i + 4 end
    local cur = redis.call('GET', key)
    if cur and cur ~= 'q' and cur ~= me and lock_live(cur) then
        local _, state = parse_entry(v)
        retire(c, state, 'lock', 0)
        redis.call('PUBLISH', events_key, cjson.encode({id = id, status = 'duplicate'}))
        return 0, i + 4
    end
    redis.call('SET', key, me, 'EX', ttl)
    return 1, i + 4
end

-- adopt p C raw: the payload `raw` that D's BLMOVE put in P:landing:D:p becomes
-- claim C. Returns the attempt number it runs as (1 unless it has a past, see
-- P:history); 0 if it was adopted before and settled since (a repeat: the landing
-- list is not touched, where a later payload of the same text may wait for its own
-- claim); -1 if it is no longer there (recovered meanwhile).
ops.adopt = function(i)
    local p, c, raw = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local v = entry(c)
    if v then
        local _, state = parse_entry(v)
        if is_claimed(state) then return used(state) + 1, i + 4 end
        return tonumber(state), i + 4
    end
    local marks = adopted_key(D)
    local can_mark = unwritable(marks, 'hash') == nil
    if can_mark and tonumber(c) <= tonumber(redis.call('HGET', marks, p) or '0') then
        return 0, i + 4
    end
    local landing = landing_key(D, p)
    if unwritable(landing, 'list') or redis.call('LREM', landing, 1, raw) == 0 then
        return -1, i + 4
    end
    local recoveries, attempts = recall(raw)
    redis.call('HSET', inflight, c, make_entry(p, 'c' .. attempts, recoveries, raw))
    if can_mark then
        redis.call('HSET', marks, p, c)
        redis.call('EXPIRE', marks, 86400)
    end
    return attempts + 1, i + 4
end

-- progress C id value ttl: a running job's progress (JSON) -> its job hash. 1; 0 if the
-- hash key has the wrong type; -1 if the claim is gone.
ops.progress = function(i)
    local c, id, value, ttl = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    if not entry(c) then return -1, i + 5 end
    if unwritable(job_key(id), 'hash') then return 0, i + 5 end
    redis.call('HSET', job_key(id), 'progress', value)
    redis.call('EXPIRE', job_key(id), ttl)
    return 1, i + 5
end

-- drop p nbytes reason sha1: a landed payload of nbytes (and of that SHA-1, unless
-- sha1 is empty) goes from P:landing:D:p to the dead letters by reference, with
-- `reason` (the daemon does not send it back: over max_payload_bytes, or an adopt
-- Redis refused). 1; 0 if none is there; -3 if the dead letters cannot be written.
ops.drop = function(i)
    local p, nbytes, reason, sha = ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4]
    local landing = landing_key(D, p)
    if unwritable(landing, 'list') then return 0, i + 5 end
    for _, v in ipairs(redis.call('LRANGE', landing, 0, -1)) do
        if string.len(v) == nbytes and (sha == '' or redis.sha1hex(v) == sha) then
            if not dead_writable() then return -3, i + 5 end
            redis.call('LREM', landing, 1, v)
            dead_by_reference(p, v, reason)
            if string.len(v) <= DECODE_MAX then
                unlock(unique_id(v), nil, false)  -- its push's "q"
            end
            return 1, i + 5
        end
    end
    return 0, i + 5
end

-- start C json id ttl n k v ...: claim C is recorded as running: its entry gets the
-- attempt number (and `json`, the payload with its id pinned, if not empty), the job
-- hash the fields. Returns the attempt number.
ops.start = function(i)
    local c, json, id, ttl = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    local fields, nxt = read_list(i + 5)
    local v = entry(c)
    if not v then return gone(c, 'start'), nxt end
    local p, state, recoveries, payload = parse_entry(v)
    if not is_claimed(state) then return tonumber(state), nxt end
    local why = unwritable(job_key(id), 'hash')
    if why then return fail_op(c, v, why, 'start'), nxt end
    local attempt = redis.call('HINCRBY', job_key(id), 'attempts', 1)
    if json == '' then json = payload end
    redis.call('HSET', inflight, c, make_entry(p, attempt, recoveries, json))
    fields[#fields + 1] = 'claim'
    fields[#fields + 1] = D .. '/' .. c
    -- A rerun: what the last attempt left is not this one's.
    local stale = nil
    if attempt > 1 then stale = {'finished_at', 'duration_s', 'retry_at', 'result', 'progress'} end
    write_job(id, ttl, fields, stale)
    return attempt, nxt
end

-- finish C id ttl flags attempt outcome n k v ...: a success recorded in one step, for
-- a job that ended before its start was recorded: claim -> succeeded. The daemon wrote
-- the outcome and fields for attempt number `attempt` (from what the claim returned);
-- if the job hash counts otherwise (a producer reused the id, say) nothing is written
-- and -4 tells the daemon to record its start and then its end instead. Returns the
-- attempt number.
ops.finish = function(i)
    local c, id, ttl, flags, attempt, outcome =
        ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], tonumber(ARGV[i + 5]), ARGV[i + 6]
    local fields, nxt = read_list(i + 7)
    local v = entry(c)
    if not v then return gone(c, 'finish'), nxt end
    -- (This runs for every short job, so the job hash's type is checked by the read of
    -- its attempts, and the done list's by its push, the op's first write: each is a
    -- command fewer than a TYPE first.)
    local why = flags ~= '' and check(settle_targets(id, flags, {}))
    if why then return fail_op(c, v, why, 'finish'), nxt end
    local state = entry_state(v)
    local so_far = 0
    if id ~= '' then
        so_far = redis.pcall('HGET', job_key(id), 'attempts')
        why = failed(so_far, job_key(id), 'hash')
        if why then return fail_op(c, v, why, 'finish'), nxt end
        so_far = tonumber(so_far or '0')
    end
    if not is_claimed(state) or so_far + 1 ~= attempt then
        return -4, nxt
    end
    why = push_done(id, ttl, outcome)
    if why then return fail_op(c, v, why, 'finish'), nxt end
    retire(c, state, 'finish', attempt)
    fields[#fields + 1] = 'claim'
    fields[#fields + 1] = D .. '/' .. c
    -- A rerun that succeeds: what the failed attempts left is not this one's.
    write_job(id, ttl, fields, attempt > 1 and {'error', 'traceback', 'retry_at'} or nil)
    redis.call('PUBLISH', events_key, outcome)
    count('succeeded')
    settled(id, c, flags, ttl, nil)
    return attempt, nxt
end

-- end C id ttl flags done dead member due_ms outcome ndel k... n k v ...: a started run
-- ended: the job hash gets the fields (and loses the ndel ones); the done list the
-- outcome if done = "1"; the dead letters `dead` if not empty; the schedule `member`
-- at due_ms (Redis clock) if not empty. 1 (also when repeated: see P:retired:D); -1
-- if the claim is gone.
ops['end'] = function(i)
    local c, id, ttl, flags, done, dead, member, due_ms, outcome =
        ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
        ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]
    local dels, fields, nxt
    dels, nxt = read_list(i + 10)
    fields, nxt = read_list(nxt)
    local v = entry(c)
    if not v then return gone(c, 'end'), nxt end
    local targets = settle_targets(id, flags, {{job_key(id), 'hash'}})
    if done == '1' then targets[#targets + 1] = {done_key(id), 'list'} end
    if dead ~= '' then targets[#targets + 1] = {dead_key, 'list'} end
    if member ~= '' then targets[#targets + 1] = {scheduled_key, 'zset'} end
    local why = check(targets)
    if why then return fail_op(c, v, why, 'end'), nxt end
    local _, state, recoveries = parse_entry(v)
    retire(c, state, 'end', 1)
    write_job(id, ttl, fields, dels)
    if done == '1' then push_done(id, ttl, outcome) end
    if dead ~= '' then push_dead(dead) end
    if member ~= '' then
        redis.call('ZADD', scheduled_key, tonumber(due_ms), member)
        local _, json = parse_member(member)
        remember(json, recoveries, used(state))
    end
    redis.call('PUBLISH', events_key, outcome)
    if member ~= '' then
        count('failed')
    elseif dead ~= '' then
        count('dead')
    elseif string.find(flags, 'c', 1, true) then
        count('cancelled')
    else
        count('succeeded')
    end
    settled(id, c, flags, ttl, member ~= '' and tonumber(due_ms) or nil)
    return 1, nxt
end

-- reject C id ttl outcome dead n k v ...: a claimed payload that can never run goes
-- to the dead letters (`dead`, made by the daemon with the reason); its job hash and
-- done list say so if it has an id. 1; -1 if the claim is gone.
ops.reject = function(i)
    local c, id, ttl, outcome, dead = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
    local fields, nxt = read_list(i + 6)
    local v = entry(c)
    if not v then return gone(c, 'reject'), nxt end
    local targets = {{dead_key, 'list'}}
    if id ~= '' then
        targets[#targets + 1] = {job_key(id), 'hash'}
        targets[#targets + 1] = {done_key(id), 'list'}
    end
    local why = check(targets)
    if why then return fail_op(c, v, why, 'reject'), nxt end
    local _, state, _, payload = parse_entry(v)
    retire(c, state, 'reject', 1)
    push_dead(dead)
    if id ~= '' then
        write_job(id, ttl, fields, nil)
        push_done(id, ttl, outcome)
    end
    unlock(unique_id(payload), D .. '/' .. c, false)
    redis.call('PUBLISH', events_key, outcome)
    count('dead')
    return 1, nxt
end

-- schedule C id ttl member due_ms n k v ...: a claimed job not due yet goes to the
-- schedule at due_ms (Redis clock). 1 (also when repeated); -1 if the claim is gone.
ops.schedule = function(i)
    local c, id, ttl, member, due_ms = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
    local fields, nxt = read_list(i + 6)
    local v = entry(c)
    if not v then return gone(c, 'schedule'), nxt end
    local why = check({{scheduled_key, 'zset'}, {job_key(id), 'hash'}})
    if why then return fail_op(c, v, why, 'schedule'), nxt end
    local _, state = parse_entry(v)
    retire(c, state, 'schedule', 1)
    redis.call('ZADD', scheduled_key, tonumber(due_ms), member)
    write_job(id, ttl, fields, nil)
    return 1, nxt
end

-- release n C1 .. Cn: claims (given in claim order) go back to the head of their
-- queues, uncharged, keeping their order; a started one's job hash is set back to
-- "queued" and its attempt uncounted. Returns how many were still held.
ops.release = function(i)
    local cs, nxt = read_list(i + 1)
    local n = 0
    for k = #cs, 1, -1 do
        local c = cs[k]
        local v = entry(c)
        if not v then
            if gone(c, 'release') == 1 then n = n + 1 end
        else
            local p, state, recoveries, payload = parse_entry(v)
            local why = unwritable(queue_key(p), 'list')
            if why then
                fail_op(c, v, why, 'release')
            else
                retire(c, state, 'release', 1)
                redis.call('RPUSH', queue_key(p), payload)
                unlock(unique_id(payload), D .. '/' .. c, true)
                -- Uncharged: a started one's attempt is taken back.
                local before = used(state)
                if not is_claimed(state) then before = before - 1 end
                remember(payload, recoveries, math.max(0, before))
                if not is_claimed(state) then
                    local ok, job = pcall(cjson.decode, payload)
                    if ok and type(job) == 'table' and type(job.id) == 'string'
                        and unwritable(job_key(job.id), 'hash') == nil then
                        redis.call('HINCRBY', job_key(job.id), 'attempts', -1)
                        redis.call('HSET', job_key(job.id), 'status', 'queued')
                    end
                end
                n = n + 1
            end
        end
    end
    return n, nxt
end

-- bury C id reason: claim C goes to the dead letters by reference, with `reason` (the
-- daemon's last resort for an op that Redis refuses); job `id` (if not empty) is
-- marked dead in its hash and done list. 1; -1 if the claim is gone.
ops.bury = function(i)
    local c, id, reason = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local v = entry(c)
    if not v then return gone(c, 'bury'), i + 4 end
    if not dead_writable() then return -3, i + 4 end
    local p, state, _, payload = parse_entry(v)
    retire(c, state, 'bury', 1)
    dead_by_reference(p, payload, reason, {id = id ~= '' and id or cjson.null})
    if id ~= '' then mark_dead(id, p, reason) end
    unlock(unique_id(payload), D .. '/' .. c, false)
    return 1, i + 4
end

-- restore lo hi: claims lo..hi still held and not started (those of a claim whose
-- reply was lost, so the daemon never saw them) go back to the head of their queues
-- in order. Returns how many.
ops.restore = function(i)
    local lo, hi = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    local n = 0
    for c = hi, lo, -1 do
        local v = entry(tostring(c))
        if not v then
            if gone(tostring(c), 'restore') == 1 then n = n + 1 end
        else
            local p, state, recoveries, payload = parse_entry(v)
            if is_claimed(state) and unwritable(queue_key(p), 'list') == nil then
                retire(tostring(c), state, 'restore', 1)
                redis.call('RPUSH', queue_key(p), payload)
                remember(payload, recoveries, used(state))
                n = n + 1
            end
        end
    end
    return n, i + 3
end

-- unland p: everything in P:landing:D:p goes back to the head of P:queue:p (after a
-- blocking wait whose reply was lost). Returns how many. With P:landing:D:p of the
-- wrong type (the wait failed on it) the call is refused as for P:inflight:D: D
-- cannot wait there again.
ops.unland = function(i)
    local p = ARGV[i + 1]
    local broken = unwritable(landing_key(D, p), 'list')
    if broken then return redis.error_reply('prioqd: daemon state unusable: ' .. broken) end
    if unwritable(queue_key(p), 'list') then return 0, i + 2 end
    return restore_landing(D, p, false, 0), i + 2
end

if command == 'cycle' then
    D = ARGV[3]
    inflight = inflight_key(D)
    -- Every op and every claim writes here: with it of another type nothing D holds
    -- can be recorded (its claims are gone with the hash), and only a new daemon id
    -- helps. Refused before any write, with a reason the daemon recognises.
    local broken = unwritable(inflight, 'hash')
    if broken then return redis.error_reply('prioqd: daemon state unusable: ' .. broken) end
    local next_claim = tonumber(ARGV[4])
    local max_bytes = tonumber(ARGV[5])
    max_dead = tonumber(ARGV[6])
    local tokens = tonumber(ARGV[7])
    retired = retired_key(D)
    if ARGV[8] == '0' then
        redis.call('DEL', retired)
    elseif unwritable(retired, 'hash') then
        -- (Repeats then answer "claim gone": their jobs are not lost, only misreported.)
        skipped(unwritable(retired, 'hash') .. ': deleted')
        redis.call('DEL', retired)
    end
    local nprio = tonumber(ARGV[9])
    local i = 10 + 2 * nprio
    local results = {}
    while i <= #ARGV do
        local op = ops[ARGV[i]]
        if not op then return redis.error_reply('prioqd: unknown cycle op ' .. tostring(ARGV[i])) end
        local r
        r, i = op(i)
        if i == nil then return r end  -- an op refused the whole call (an error reply)
        results[#results + 1] = r
    end
    local score = redis.call('ZSCORE', daemons_key, D)
    local held = score and tonumber(score) > now_ms()
    local claimed, dropped, paused = {}, {}, {}
    if held and tokens > 0 then
        -- (A pcall, not a TYPE first: this runs every claim. Of another type, nothing
        -- is paused, and the daemon reports it.)
        paused = redis.pcall('SMEMBERS', paused_key)
        if paused.err then
            skipped(unwritable(paused_key, 'set') .. ': read as no priority paused')
            paused = {}
        end
        local skip = {}
        for _, p in ipairs(paused) do skip[p] = true end
        -- (A key of another type there must not fail the claim after its RPOP: the
        -- payload would be lost. The payloads' pasts are then simply not known.)
        local history = redis.call('TYPE', history_key)['ok'] == 'hash'
        for k = 0, nprio - 1 do
            if tokens <= 0 then break end
            local p, size = ARGV[10 + 2 * k], tonumber(ARGV[11 + 2 * k])
            local queue = queue_key(p)
            if not skip[p] and unwritable(queue, 'list') == nil then
                local cap, n = tokens * size, 0
                while n < cap do
                    local v = redis.call('RPOP', queue)
                    if not v then break end
                    if string.len(v) > max_bytes and not dead_writable() then
                        redis.call('RPUSH', queue, v)  -- left at the head: nowhere to put it
                        break
                    elseif string.len(v) > max_bytes then
                        local reason = 'payload is ' .. string.len(v) ..
                            ' bytes, over max_payload_bytes=' .. max_bytes
                        dead_by_reference(p, v, reason)
                        if string.len(v) <= DECODE_MAX then
                            unlock(unique_id(v), nil, false)  -- its push's "q"
                        end
                        dropped[#dropped + 1] = p .. ': ' .. reason
                    else
                        local recoveries, attempts = 0, 0
                        if history then recoveries, attempts = recall(v) end
                        -- (Numbers are spelled out only when not 0: Lua turns a
                        -- number into text with sprintf, for every claim.)
                        local state = attempts == 0 and 'c0' or 'c' .. attempts
                        redis.call('HSET', inflight, tostring(next_claim),
                            make_entry(p, state, recoveries == 0 and '0' or recoveries, v))
                        next_claim = next_claim + 1
                        claimed[#claimed + 1] = p
                        claimed[#claimed + 1] = v
                        claimed[#claimed + 1] = attempts
                        n = n + 1
                    end
                end
                tokens = tokens - math.ceil(n / size)
            end
        end
    end
    count_outcomes()
    return {results, claimed, held and 1 or 0, dropped, trimmed, paused, problems}
end

-- heartbeat D lease_ms max_recover max_recoveries max_dead field value field value ...
-- Extends D's lease (registering it, with the given info fields, if it has none).
-- Only if D's own lease was unbroken (it had not expired) does it then recover up to
-- max_recover daemons whose lease has run out: after a stall of Redis every lease
-- has run out, and the first daemon to speak must not take the others' jobs.
-- Returns {registered (1: D had no lease; it was recovered, or is new), lapsed (1: D's
-- lease had expired but nobody had recovered it), recovered daemon ids joined by ',',
-- jobs put back, jobs dead-lettered as poison, ms until the next scheduled job or -1,
-- Redis's clock in ms, dead letters trimmed, keys of the wrong type the recoveries
-- left as they were (one reason a line)}.
if command == 'heartbeat' then
    local d = ARGV[3]
    local lease_ms = tonumber(ARGV[4])
    local max_recover = tonumber(ARGV[5])
    local max_recoveries = tonumber(ARGV[6])
    max_dead = tonumber(ARGV[7])
    local now = now_ms()
    -- One read says both who else's lease ran out and whether ours did (lowest scores
    -- first: we may be among them); only a long list needs asking about us directly.
    local expired = redis.call('ZRANGEBYSCORE', daemons_key, '-inf', '(' .. now,
        'LIMIT', 0, max_recover + 1)
    local lapsed = false
    for k, other in ipairs(expired) do
        if other == d then
            lapsed = true
            table.remove(expired, k)
            break
        end
    end
    if #expired > max_recover then
        local own = redis.call('ZSCORE', daemons_key, d)
        lapsed = lapsed or (own ~= false and tonumber(own) < now)
        expired[#expired] = nil
    end
    local registered = redis.call('ZADD', daemons_key, now + lease_ms, d) == 1
    local held = not registered and not lapsed
    if registered and #ARGV >= 8 then
        redis.call('DEL', daemon_key(d))
        redis.call('HSET', daemon_key(d), unpack(ARGV, 8))
    end
    local queued, dead = 0, 0
    if not held then expired = {} end
    if held then
        if #expired > 0 then
            -- Idle daemons heartbeat forever: only pay for this when someone died.
            local fallback = {}
            local mine = redis.pcall('HGET', daemon_key(d), 'priorities')
            if type(mine) == 'string' then fallback = split_csv(mine) end
            for _, other in ipairs(expired) do
                local r = recover(other, fallback, true, max_recoveries)
                queued, dead = queued + r[1], dead + r[2]
            end
        end
    end
    return {registered and 1 or 0, lapsed and 1 or 0, table.concat(expired, ','),
        queued, dead, next_due_in(now), now, trimmed, table.concat(problems, '\n')}
end

-- recover D died max_recoveries max_dead p1 p2 ...
-- Puts everything D holds back at the head of its queues and forgets D. Used by a
-- daemon on a clean stop (for itself: died = 0) and at start-up for a dead
-- predecessor on the same host (died = 1). The priorities are a fallback for a D
-- with no info hash. Returns {jobs put back, jobs dead-lettered as poison, dead
-- letters trimmed, keys of the wrong type left as they were (one reason a line)}.
if command == 'recover' then
    max_dead = tonumber(ARGV[6])
    local r = recover(ARGV[3], {unpack(ARGV, 7)}, ARGV[4] == '1', tonumber(ARGV[5]))
    return {r[1], r[2], trimmed, table.concat(problems, '\n')}
end

-- undead entry p payload id payload_key lock_ttl
-- Moves one dead letter (matched by its exact text) back to the tail of queue p as
-- a fresh job: its attempts start again from 0. The payload is `payload`, or the
-- value of `payload_key` (deleted here) if that is not empty. A unique job takes its
-- lock ("q", for lock_ttl seconds) as a push does; if a live job holds it, the letter
-- stays (-2: it would run twice). Returns 1, or 0 if the letter is gone, or -1 if its
-- payload key is; an error (nothing written) if a key it would write has the wrong
-- type.
if command == 'undead' then
    local entry_text, p, payload, id, pkey = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
    local targets = {{dead_key, 'list'}, {queue_key(p), 'list'}}
    if id ~= '' then targets[#targets + 1] = {job_key(id), 'hash'} end
    if pkey ~= '' then targets[#targets + 1] = {pkey, 'string'} end
    local why = check(targets)
    if why then return redis.error_reply('prioqd: ' .. why) end
    if pkey ~= '' then
        payload = redis.call('GET', pkey)
        if not payload then return -1 end
    end
    if not redis.call('LPOS', dead_key, entry_text) then return 0 end
    local uid = unique_id(payload)
    if uid then
        why = unwritable(unique_key(uid), 'string')
        if why then return redis.error_reply('prioqd: ' .. why) end
        local cur = redis.call('GET', unique_key(uid))
        if cur and lock_live(cur) then return -2 end
    end
    if redis.call('LREM', dead_key, 1, entry_text) == 0 then return 0 end
    if pkey ~= '' then redis.call('DEL', pkey) end
    if uid then redis.call('SET', unique_key(uid), 'q', 'EX', tonumber(ARGV[8])) end
    redis.call('LPUSH', queue_key(p), payload)
    if id ~= '' and redis.call('EXISTS', job_key(id)) == 1 then
        redis.call('HSET', job_key(id), 'status', 'queued', 'attempts', 0)
        redis.call('DEL', done_key(id))
    end
    return 1
end

-- purge: deletes every dead letter and the payload keys they name, at once.
-- Returns how many letters there were.
if command == 'purge' then
    local letters = redis.call('LRANGE', dead_key, 0, -1)
    for _, letter in ipairs(letters) do
        local ok, obj = pcall(cjson.decode, letter)
        if ok and type(obj) == 'table' and type(obj.payload_key) == 'string' then
            redis.call('DEL', obj.payload_key)
        end
    end
    redis.call('DEL', dead_key)
    return #letters
end

-- promote max max_dead
-- Moves up to max due jobs from the schedule to the tail of their queues, in due
-- order. A due job for a priority no registered daemon serves goes to the dead
-- letters instead (it would otherwise wait forever in a queue nobody reads).
-- Returns {moved, dead-lettered, ms until the next scheduled job or -1, dead letters
-- trimmed}.
if command == 'promote' then
    max_dead = tonumber(ARGV[4])
    local now = now_ms()
    if unwritable(scheduled_key, 'zset') then return {0, 0, -1, 0} end
    local due = redis.call('ZRANGEBYSCORE', scheduled_key, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
    if #due == 0 then return {0, 0, next_due_in(now), 0} end
    local served = {}
    for _, d in ipairs(redis.call('ZRANGE', daemons_key, 0, -1)) do
        -- (One daemon's info of the wrong type must not stop every promotion.)
        local prios = redis.pcall('HGET', daemon_key(d), 'priorities')
        if type(prios) == 'string' then
            for _, p in ipairs(split_csv(prios)) do served[p] = true end
        end
    end
    local moved, dead, done = 0, 0, {}
    local can_bury = dead_writable()
    for _, member in ipairs(due) do
        local p, json = parse_member(member)
        if served[p] and unwritable(queue_key(p), 'list') == nil then
            redis.call('LPUSH', queue_key(p), json)
            moved = moved + 1
            done[#done + 1] = member
        elseif can_bury then
            local reason = 'no daemon serves priority ' .. p
            if served[p] then reason = 'redis error: ' .. unwritable(queue_key(p), 'list') end
            dead_by_reference(p, json, reason)
            unlock(unique_id(json), nil, false)
            dead = dead + 1
            done[#done + 1] = member
        end
        -- (Nowhere to go: it stays in the schedule.)
    end
    if #done > 0 then redis.call('ZREM', scheduled_key, unpack(done)) end
    return {moved, dead, next_due_in(now), trimmed}
end

-- periodic name tick_ms p payload catch_up
-- Enqueues a [[schedule]] tick exactly once, whichever daemons offer it: only if no
-- tick of that name as late or later was handled. A catch-up (catch_up = 1: the
-- tick is long past) for a name never seen before is only recorded, not enqueued:
-- nothing was missed, the schedule is new. A tick later than Redis's clock by more
-- than FUTURE_TICK_MS is refused: the clock of the daemon offering it jumped ahead,
-- and recorded, it would make every daemon skip the real ticks up to it. Returns 1
-- enqueued, 0 already handled (or recorded only), -1 refused as later than Redis's
-- clock; an error (nothing written) if P:periodic or the queue has the wrong type.
local FUTURE_TICK_MS = 1000
if command == 'periodic' then
    local name, tick, p, payload, catch_up = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
    if tick > now_ms() + FUTURE_TICK_MS then return -1 end
    local key = prefix .. ':periodic'
    -- Checked before the tick is recorded: a tick recorded but not pushed is lost.
    local why = check({{key, 'hash'}, {queue_key(p), 'list'}})
    if why then return redis.error_reply('prioqd: ' .. why) end
    local last = redis.call('HGET', key, name)
    if last and tonumber(last) >= tick then return 0 end
    redis.call('HSET', key, name, tick)
    if catch_up == '1' and not last then return 0 end
    redis.call('LPUSH', queue_key(p), payload)
    redis.call('HSET', key, name .. ':enqueued', tick)
    return 1
end

-- ---------------------------------------------------------------------------------
-- Producers' commands: prioqd.client and `prioqd submit`. A raw LPUSH stays the
-- contract; these add what one LPUSH cannot do atomically.
-- ---------------------------------------------------------------------------------

-- enqueue p payload id unique ttl
-- Pushes `payload` (the job JSON, with its id) onto P:queue:p as a producer's LPUSH
-- would. What an earlier job with this id left (P:job:<id>, P:done:<id>, a cancel in
-- P:cancels) is deleted first, so that it cannot answer a waiter or shorten the new
-- job's retries. With unique = "1" the push happens only if no live lock is there
-- (P:unique:<id> absent, or naming a claim that is gone: see `lock_live`) and then
-- sets it to "q" EX ttl (the check and the push are this one step); otherwise nothing
-- is written but {"id", "status": "duplicate"} on P:events. `ttl` is a safety expiry
-- for a lock nobody releases (the daemons take it over when they claim the job).
-- Returns 1 pushed, 0 a duplicate of a live unique job.
if command == 'enqueue' then
    local p, payload, id, unique, ttl = ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1', ARGV[7]
    local lock = unique_key(id)
    local targets = {{queue_key(p), 'list'}, {job_key(id), 'hash'}, {done_key(id), 'list'},
        {cancels_key, 'zset'}}
    if unique then targets[#targets + 1] = {lock, 'string'} end
    local why = check(targets)
    if why then return redis.error_reply('prioqd: ' .. why) end
    if unique then
        local cur = redis.call('GET', lock)
        if cur and lock_live(cur) then
            redis.call('PUBLISH', events_key, cjson.encode({id = id, status = 'duplicate'}))
            return 0
        end
        redis.call('SET', lock, 'q', 'EX', ttl)
    end
    redis.call('DEL', job_key(id), done_key(id))
    withdraw_cancel(id)
    redis.call('LPUSH', queue_key(p), payload)
    return 1
end

-- cancel_queued p raw id ttl unique outcome n k v ...
-- cancel_scheduled member id ttl unique outcome n k v ...
-- Cancels a job that waits: removes the exact element `raw` from P:queue:p (one
-- LREM), or `member` from P:scheduled. If it was there, the job hash gets the fields
-- (status "cancelled"), the done list and P:events the outcome, and a unique job
-- (unique = "1") gives up its lock if the lock says "q" (queued, no run). Returns 1,
-- or 0 if the element was no longer there (a daemon took it meanwhile).
if command == 'cancel_queued' or command == 'cancel_scheduled' then
    local queued = command == 'cancel_queued'
    local i = queued and 4 or 3
    local id, ttl, unique, outcome = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3] == '1', ARGV[i + 4]
    local fields = read_list(i + 5)
    local lock = unique_key(id)
    local targets = {{job_key(id), 'hash'}, {done_key(id), 'list'}}
    if unique then targets[#targets + 1] = {lock, 'string'} end
    if queued then
        targets[#targets + 1] = {queue_key(ARGV[3]), 'list'}
    else
        targets[#targets + 1] = {scheduled_key, 'zset'}
    end
    local why = check(targets)
    if why then return redis.error_reply('prioqd: ' .. why) end
    local removed
    if queued then
        removed = redis.call('LREM', queue_key(ARGV[3]), 1, ARGV[4])
    else
        removed = redis.call('ZREM', scheduled_key, ARGV[3])
    end
    if removed == 0 then return 0 end
    write_job(id, ttl, fields, {'result', 'retry_at', 'traceback'})
    push_done(id, ttl, outcome)
    redis.call('PUBLISH', events_key, outcome)
    count('cancelled')
    count_outcomes()
    if unique and redis.call('GET', lock) == 'q' then redis.call('DEL', lock) end
    return 1
end

-- cancel_held keep_ms id [id ...]
-- Asks the daemons to cancel jobs they hold: P:cancels gets id -> expiry (now +
-- keep_ms, Redis clock; expired entries are pruned here) and P:control the note
-- {"op": "cancel", "ids": [id, ...]}. The daemon that holds a job kills or drops it
-- and writes the outcome "cancelled". Returns how many subscribers got the note.
if command == 'cancel_held' then
    local keep_ms = tonumber(ARGV[3])
    local ids = {}
    for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
    if #ids == 0 then return 0 end
    local why = unwritable(cancels_key, 'zset')
    if why then return redis.error_reply('prioqd: ' .. why) end
    local now = now_ms()
    redis.call('ZREMRANGEBYSCORE', cancels_key, '-inf', '(' .. now)
    for _, id in ipairs(ids) do redis.call('ZADD', cancels_key, now + keep_ms, id) end
    return redis.call('PUBLISH', control_key, cjson.encode({op = 'cancel', ids = ids}))
end

return redis.error_reply('prioqd: unknown command ' .. tostring(command))
