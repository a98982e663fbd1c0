/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Leaves protected mode for real mode and comes back, several times, the ways PC code
 * does: a 16-bit protected-mode segment, CR0.PE cleared (MOV CR0) and a far JMP to a
 * real-mode CS; back with LGDT, CR0.PE set (MOV CR0, or LMSW) and a far JMP to a 32-bit
 * code segment. In real mode it runs interrupts through the IVT (INT n, a #DE that the
 * handler fixes, INT3, single steps, #GP for code past CS's limit), PUSHF/POPF and
 * CLI/STI, port I/O, and "unreal"
 * mode: a 4-GiB FS limit loaded in protected mode, used for loads and stores above
 * 1 MiB. Each step prints to COM1; the exit code is 0x2a after the last round.
 *
 * The real-mode code is copied to 0x7000 (CS 0x0700) and runs with SS:SP 0:0x6000.
 */
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
	.set MB_FLAGS, 0
	.set LOW, 0x7000
	.set ROUNDS, 3
#define RM(x) ((x) - rm_start)

/* Single steps through the IVT (vector 1): POPF sets TF, a #DB after each instruction
   from the next one on, up to the POPF that clears TF (which traps after itself):
   six. */
.macro SINGLE_STEP
	mov	byte ptr cs:[RM(dbcount)], 0
	pushf
	pop	ax
	or	ax, 0x100
	push	ax
	popf
	nop
	pushf
	pop	ax
	and	ax, 0xfeff
	push	ax
	popf
	mov	ax, ss
	mov	ss, ax
	cmp	byte ptr cs:[RM(dbcount)], 6
	jne	rm_fail
.endm
	.balign 4
mbh:	.long	0x1badb002, MB_FLAGS, -(0x1badb002 + MB_FLAGS)
_start:
	mov	esp, 0x8000
	lgdt	[gdtr]
	jmp	0x08:1f
1:	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	mov	fs, ax
	mov	gs, ax
	lea	esi, s_hello
	call	puts
	/* The real-mode code to 0x7000; the IVT: INT 0x60, #DE, INT3. */
	mov	esi, offset rm_start
	mov	edi, LOW
	mov	ecx, offset rm_end - rm_start
	rep movsb
	mov	dword ptr [0x60 * 4], (LOW >> 4) << 16 | RM(int60)
	mov	dword ptr [0 * 4], (LOW >> 4) << 16 | RM(int_de)
	mov	dword ptr [3 * 4], (LOW >> 4) << 16 | RM(int_bp)
	mov	dword ptr [1 * 4], (LOW >> 4) << 16 | RM(int_db)
	mov	dword ptr [13 * 4], (LOW >> 4) << 16 | RM(int_gp)
	/* A 3-byte MOV at 1000:FFFE, past CS's 64-KiB limit (#GP); were it run, IP
	   would wrap to 1000:0001, where a far JMP goes to rm_fail. */
	mov	byte ptr [0x1fffe], 0xb8
	mov	word ptr [0x1ffff], 0x1234
	mov	byte ptr [0x10001], 0xea
	mov	word ptr [0x10002], RM(rm_fail)
	mov	word ptr [0x10004], LOW >> 4
	mov	dword ptr [round], 0
	mov	dword ptr [unreal_in], 0x600dcafe

/* Protected mode, 32-bit: each round goes to real mode and comes back here. */
pm_again:
	mov	eax, [round]
	cmp	eax, ROUNDS
	je	done
	inc	dword ptr [round]
	lea	esi, s_round
	call	puts
	mov	eax, [round]
	add	al, '0'
	call	putc
	mov	al, '\n'
	call	putc
	/* The round number for the real-mode code, in CMOS RAM's byte 0x41. */
	mov	al, 0x41
	out	0x70, al
	mov	al, [round]
	out	0x71, al
	jmp	0x18:(LOW + RM(pm16))

done:
	/* What real mode stored above 1 MiB through FS. */
	mov	eax, [unreal_out]
	cmp	eax, 0x600dcafe + ROUNDS
	jne	fail
	lea	esi, s_done
	call	puts
	mov	al, 0x2a
	out	0xf4, al
	hlt

fail:	lea	esi, s_fail
	call	puts
	mov	al, 1
	out	0xf4, al
	hlt

/* puts(esi), putc(al): COM1. */
puts:	lodsb
	test	al, al
	jz	2f
	call	putc
	jmp	puts
2:	ret
putc:	mov	dx, 0x3f8
	out	dx, al
	ret

	.balign 16
rm_start:
	.code16
/* 16-bit protected mode (CS base 0: offsets are linear). */
pm16:
	mov	ax, 0x20
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	mov	fs, ax
	mov	gs, ax
	mov	eax, cr0
	and	eax, ~1
	mov	cr0, eax
	/* Real mode now, with protected-mode segments until they are reloaded. */
	jmp	(LOW >> 4):RM(rm_entry)
rm_entry:
	xor	ax, ax
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	mov	fs, ax
	mov	gs, ax
	mov	sp, 0x6000
	lidt	cs:[RM(ivt)]
	sti
	mov	si, RM(s_real)
	call	rm_puts
	/* INT 0x60 through the IVT: its handler prints and sets BX. */
	mov	bx, 0
	int	0x60
	cmp	bx, 0x1234
	jne	rm_fail
	/* #DE through the IVT: the handler makes the divisor 5; DIV runs again. */
	mov	ax, 100
	mov	cl, 0
	div	cl
	cmp	al, 20
	jne	rm_fail
	/* INT3: a trap, back after it. */
	mov	dx, 0
	int3
	cmp	dx, 3
	jne	rm_fail
	/* PUSHF/POPF and CLI/STI: IF as set. */
	cli
	pushf
	pop	ax
	test	ax, 0x200
	jnz	rm_fail
	or	ax, 0x200
	push	ax
	popf
	pushf
	pop	ax
	test	ax, 0x200
	jz	rm_fail
	SINGLE_STEP
	/* Code past CS's limit: #GP through the IVT, whose handler comes back here. */
	jmp	0x1000:0xfffe
gp_back:
	/* Port I/O: the round number from CMOS RAM. */
	mov	al, 0x41
	out	0x70, al
	in	al, 0x71
	mov	cl, al
	/* Unreal mode: protected mode again for a 4-GiB FS limit, which stays when
	   CR0.PE is cleared (no far JMP: CS 0x0700 serves both modes). */
	lgdt	cs:[RM(gdtr16)]
	mov	eax, cr0
	or	eax, 1
	mov	cr0, eax
	mov	ax, 0x28
	mov	fs, ax
	mov	eax, cr0
	and	eax, ~1
	mov	cr0, eax
	mov	esi, offset unreal_in
	mov	eax, fs:[esi]
	movzx	ecx, cl
	add	eax, ecx
	mov	edi, offset unreal_out
	mov	fs:[edi], eax
	SINGLE_STEP
	mov	si, RM(s_unreal)
	call	rm_puts
	/* Back to protected mode: LGDT from real mode, PE by MOV CR0 or (round 2) LMSW. */
	cli
	lgdt	cs:[RM(gdtr16)]
	cmp	cl, 2
	je	1f
	mov	eax, cr0
	or	eax, 1
	mov	cr0, eax
	jmp	2f
1:	smsw	ax
	or	ax, 1
	lmsw	ax
2:	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	mov	fs, ax
	mov	gs, ax
	mov	esp, 0x8000
	.att_syntax
	ljmpl	$0x08, $pm_again
	.intel_syntax noprefix

rm_fail:
	mov	si, RM(s_rmfail)
	call	rm_puts
	mov	al, 3
	out	0xf4, al
	hlt

rm_puts:
	cs lodsb
	test	al, al
	jz	1f
	mov	dx, 0x3f8
	out	dx, al
	jmp	rm_puts
1:	ret

int60:	push	si
	mov	si, RM(s_int)
	call	rm_puts
	pop	si
	mov	bx, 0x1234
	iret
int_de:	mov	cl, 5
	iret
int_bp:	mov	dx, 3
	iret
int_db:	inc	byte ptr cs:[RM(dbcount)]
	iret
int_gp:	add	sp, 6
	jmp	(LOW >> 4):RM(gp_back)
dbcount: .byte	0

ivt:	.word	0x3ff
	.long	0
gdtr16:	.word	gdt_end - gdt - 1
	.long	gdt
s_real:	.asciz	"real mode\n"
s_int:	.asciz	"int 0x60 through the IVT\n"
s_unreal: .asciz "unreal mode\n"
s_rmfail: .asciz "real mode: wrong result\n"
	.code32
rm_end:

	.balign 8
gdt:	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: 32-bit code, flat */
	.quad	0x00cf92000000ffff	/* 0x10: 32-bit data, flat */
	.quad	0x00009a000000ffff	/* 0x18: 16-bit code, base 0, 64 KiB */
	.quad	0x000092000000ffff	/* 0x20: 16-bit data, base 0, 64 KiB */
	.quad	0x008f92000000ffff	/* 0x28: 16-bit data, base 0, 4 GiB */
gdt_end:
gdtr:	.word	gdt_end - gdt - 1
	.long	gdt
round:	.long	0
unreal_in: .long 0
unreal_out: .long 0
s_hello: .asciz	"realmode32: protected and real mode, back and forth\n"
s_round: .asciz	"round "
s_done:	.asciz	"back in protected mode: unreal stores seen\n"
s_fail:	.asciz	"protected mode: wrong result\n"
