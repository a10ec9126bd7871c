-- Runs an Argo CD health script the way Argo CD does: the resource is the
-- global `obj`, and the script returns {status=..., message=...}.
-- Usage: lua5.4 lua_harness.lua HEALTH_SCRIPT OBJECT_FILE
-- OBJECT_FILE is a Lua chunk returning the resource as a table.
-- Prints "<status>\t<message>".
local script, object_file = arg[1], arg[2]
obj = dofile(object_file)
local hs = dofile(script)
if type(hs) ~= "table" or type(hs.status) ~= "string" then
  io.stderr:write("health script did not return {status=...}\n")
  os.exit(2)
end
io.write(hs.status, "\t", tostring(hs.message or ""), "\n")
